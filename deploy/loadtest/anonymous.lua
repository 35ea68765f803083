-- Anonymous free-model traffic: no key, a :free model, counted by the per-IP limit under its real
-- settings. Each request claims another client address (198.18.0.0/15, the benchmarking range) in
-- X-Forwarded-For, which the kit's Turnstile believes from 127.0.0.1 only.
local body = '{"model":"minimax/minimax-m2.5:free","messages":[{"role":"user","content":"Say hello"}]}'
math.randomseed(os.time())
request = function()
  local ip = "198." .. math.random(18, 19) .. "." .. math.random(0, 255) .. "." .. math.random(1, 254)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-Forwarded-For"] = ip}, body)
end
