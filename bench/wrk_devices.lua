-- Every request from another device: `&device_id=<thread>-<count>` appended to the URL, so no
-- two requests are the same (the code-push check of a fleet, where each device sends its id).
-- Also reports the tail percentiles, as wrk_tail.lua does.
local counter = 0
local threads = 0
local separator = nil

setup = function(thread)
  threads = threads + 1
  -- Becomes the global `thread_id` of that thread's own Lua state.
  thread:set("thread_id", threads)
end

request = function()
  if separator == nil then
    separator = string.find(wrk.path, "?", 1, true) and "&" or "?"
  end
  counter = counter + 1
  local device = "device_id=d" .. tostring(thread_id) .. "-" .. tostring(counter)
  return wrk.format(nil, wrk.path .. separator .. device)
end

done = function(summary, latency, requests)
  io.write(string.format(
    "tail: 99.9%% %dus 99.99%% %dus\n", latency:percentile(99.9), latency:percentile(99.99)
  ))
end
