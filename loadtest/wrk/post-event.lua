-- wrk script: POST /v1/events with a fresh UUIDv7 per request (so every request is a new event).
-- wrk -t2 -c64 -d20s -s loadtest/wrk/post-event.lua http://127.0.0.1:8080/v1/events
-- Note: wrk measures from the actual send (closed loop); the crm-load harness will measure from the
-- intended send time.
local counter = 0
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  math.randomseed(os.time() * 1000 + (tid or 0))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (os.getenv("CRM_KEY") or "demo-key")
end

local function hex(n, digits)
  return string.format("%0" .. digits .. "x", n)
end

local function uuid_v7()
  local ms = math.floor(os.time() * 1000) + counter % 1000
  local time_hex = hex(ms, 12)
  local rand_a = 0x7000 + math.random(0, 0x0fff)
  local rand_b = 0x8000 + math.random(0, 0x3fff)
  return time_hex:sub(1, 8) .. "-" .. time_hex:sub(9, 12) .. "-" .. hex(rand_a, 4) .. "-" ..
    hex(rand_b, 4) .. "-" .. hex(math.random(0, 0xffffff), 6) .. hex(math.random(0, 0xffffff), 6)
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"eventId":"%s","tenantId":"demo","customerId":"c-%d","occurredAt":"%s","source":"wrk",' ..
    '"schemaVersion":1,"pageViewed":{"url":"https://example.com/p/%d"}}',
    uuid_v7(), counter % 1000, os.date("!%Y-%m-%dT%H:%M:%SZ"), counter)
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("requests %d, non-2xx %d, socket errors %d\n", summary.requests, non2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    io.write(string.format("p%s %.2f ms\n", p, latency:percentile(p) / 1000))
  end
end
