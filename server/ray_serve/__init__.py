"""The same API served by Ray Serve over several engine replicas: `python -m workers_ai_local.ray_serve --replicas N`.

Each replica runs the whole app (`server.app.create_app`) over its own engine, so every surface behaves as on one
server. Around the replicas:
- cluster: starting or joining a Ray cluster, kept on 127.0.0.1 unless told otherwise;
- deployment: the replica (an engine plus the app) and the Serve application built from the settings;
- prefixes: what the router knows of a request (session, prompt-prefix keys), shared by router and proxy;
- router: the Serve request router (session affinity, then cached prefix, then least loaded);
- proxy: middleware inside Serve's HTTP proxy (our error shapes for Ray's own answers, the cluster's /health and
  /metrics, prefix keys read from the body).

Nothing here is imported by `python -m workers_ai_local`: Ray is an extra (`pip install -e '.[ray]'`).
"""
