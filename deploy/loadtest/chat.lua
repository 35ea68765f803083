-- Non-stream chat completions. KEY (env) is sent as the bearer key when set.
local key = os.getenv("KEY")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
wrk.body = os.getenv("BODY") or '{"model":"openai/gpt-5.4","messages":[{"role":"user","content":"Say hello"}]}'
