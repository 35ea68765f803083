-- Streaming chat completions (the mock sends its configured number of chunks).
local key = os.getenv("KEY")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
wrk.body = '{"model":"openai/gpt-5.4","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
