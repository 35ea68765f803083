-- Anonymous free-model traffic: no key, a :free model (counted by the per-IP limit).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"minimax/minimax-m2.5:free","messages":[{"role":"user","content":"Say hello"}]}'
