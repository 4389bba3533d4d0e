-- Every request different (an `x-request-id` counting up), so none repeats another byte for
-- byte: what a check costs when the server cannot reuse its parse of identical requests.
-- Also reports the tail percentiles, as wrk_tail.lua does.
local counter = 0

request = function()
  counter = counter + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do
    headers[name] = value
  end
  headers["x-request-id"] = tostring(counter)
  return wrk.format(nil, nil, headers)
end

done = function(summary, latency, requests)
  io.write(string.format(
    "tail: 99.9%% %dus 99.99%% %dus\n", latency:percentile(99.9), latency:percentile(99.99)
  ))
end
