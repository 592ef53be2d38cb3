"""Drawing workers on other PCs, through Redis (the `[cluster]` section of the config).

    bot (drawbot run)                         Redis                              worker (drawbot worker, one per GPU)
    ChatCore -> RemoteEngine.submit  ->  jobs stream per model + size tier  ->  ClusterWorker -> engine.worker.Engine
    ChatCore <- RemoteEngine events  <-  events stream (+ the PNG in the job's hash)  <-  progress / done / failed

Why Redis Streams with a consumer group and not a job library (RQ, Celery, arq, dramatiq): a long GPU job needs a
lease that the running worker renews and that another worker takes over when it lapses (XCLAIM / XAUTOCLAIM on the
group's pending entries), progress events on the way, and a fencing token on every result so a worker that comes back
late cannot deliver a stale duplicate. The libraries give at-least-once task execution but no fenced results and no
progress channel of their own; the three Redis commands above are the whole lease mechanism, so it is written here
in a few small scripts (protocol.py) on top of the `redis` client's asyncio API.

Nothing in this package is imported unless `[cluster].enabled` is true (or `drawbot worker` runs): without it, the bot
never imports redis. `settings` and `protocol` import no redis; `remote` (the bot's engine placement) and `worker`
(the GPU side) do.
"""
