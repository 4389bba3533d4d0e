-- Latency percentiles past wrk's --latency table, for bench/common.py's run_wrk(tail=True).
-- Only `done` is defined, so wrk still sends its one static request (no per-request Lua).
done = function(summary, latency, requests)
  io.write(string.format(
    "tail: 99.9%% %dus 99.99%% %dus\n", latency:percentile(99.9), latency:percentile(99.99)
  ))
end
