-- wrk prints p50..p99 with --latency; this adds the 99.9th percentile
-- (microseconds) for bench/run.py to read.
done = function(summary, latency, requests)
  io.write(string.format("P99.9 %d\n", latency:percentile(99.9)))
end
