"""`python -m fishmp serve`: one warm fishmp.Pool behind the HTTP APIs dubbing apps already speak.
Layer 8, a surface: may import every layer below; nothing below imports it.

Modules: `main` (start, the socket, signals, exit codes), `app` (routes, the request checks, the lifespan),
`tts` (fish-speech's /v1/tts), `openai` (/v1/audio/speech, /v1/models), `lines` (a single line as a job at
interactive priority; its audio in pieces as it decodes), `streaming` (streamed bodies: PCM, WAV, OpenAI's SSE),
`live` + `livetext` (the Fish Audio SDK's WebSocket /v1/tts/live; text cut at sentence ends), `models_api` (the
SDK's voice list, GET /model), `jobs_api` + `jobstore` + `jobview` (the job API, its files under the data
dir, its view folded from events; the event stream), `references_api` + `refstore` (stored voices, references by
content), `schema` (the request models), `bodies` (JSON, msgpack, forms), `formats` (wav, pcm, flac, mp3, opus),
`guards` (body size, API key), `paths` (--root), `metrics` (/metrics, one log line per request), `state` (what
handlers share: the pool, the queue bound, a job's events on the event loop), `errors` (JSON errors),
`review_api` + `retakes` (retake and accept a job's takes), `pages` (the review page: static/ at / and /jobs/{id}),
and what makes it safe to leave running (docs/security.md): `browser` (Host names, cross-origin requests, security
headers), `connections` (request deadlines, a connection bound), `datalock` (one server per data dir), `refcap`
(how long a reference may be), `sweep` (unused voices and abandoned lines).
"""
