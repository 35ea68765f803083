-- A mix of models: paid and free passthrough, an auto tier, and a translated (Anthropic) stream.
local key = os.getenv("KEY")
local bodies = {
  '{"model":"openai/gpt-5.4","messages":[{"role":"user","content":"hi"}]}',
  '{"model":"minimax/minimax-m2.5:free","messages":[{"role":"user","content":"hi"}]}',
  '{"model":"kilo-auto/balanced","messages":[{"role":"user","content":"hi"}]}',
  '{"model":"anthropic/claude-sonnet-4.6","stream":true,"messages":[{"role":"user","content":"hi"}]}',
}
local i = 0
request = function()
  i = i + 1
  local headers = {["Content-Type"] = "application/json"}
  if key and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  return wrk.format("POST", "/v1/chat/completions", headers, bodies[(i % #bodies) + 1])
end
