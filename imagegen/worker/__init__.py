"""The worker process: `imagegen worker` (or `arq imagegen.WorkerSettings`).

`arqworker` is the one seam with arq; `process` builds the clients once and holds the job function; `jobs`
is the job boundary and its failure policy; `pipeline` one prompt's steps, paying through `calls`. Around
them: generation slots (`slots`), waking on enqueue (`intake`), the jobs a worker runs (`runs`), riding out
outages (`outages`), the heartbeat and lease renewal (`heartbeat`, `periodic`), re-queueing stranded records
(`reconcile`), watching PocketBase (`watch`), accounts' credits (`credits`) and the worker's own `/metrics`
(`exporter`).
"""
