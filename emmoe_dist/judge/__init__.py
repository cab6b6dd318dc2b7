"""The LLM judge: scores every generated answer through an OpenAI-compatible endpoint.

- `rubric`: the prompts (the suite's own, else the project's) and the StrongREJECT rubric;
- `scoring`: pure parsing of replies into scores (top-20 logprobs, text fallback, rubric);
- `limits`, `cache`, `client`: rate limits, the reply cache, retries and concurrency;
- `runner`: generation records in, judged records out, resumably (`emmoe judge`);
- `scripted_server`: a scripted (mock) OpenAI-compatible judge for tests and demos.

Pointing the judge at an endpoint (the key is read from the variable `judge.api_key_env` names):

    DeepSeek-V3 (the seed paper's judge): base_url https://api.deepseek.com/v1,
        model deepseek-chat, key in $DEEPSEEK_API_KEY (api_key_env: DEEPSEEK_API_KEY)
    OpenAI (Betley et al.'s judge): base_url unset, model gpt-4o-2024-08-06, $OPENAI_API_KEY
    self-hosted vLLM / Ray Serve: base_url http://<host>:8000/v1, model as served; no key
        needed on 127.0.0.1/localhost, else any value the server expects
"""
