"""Background updates: the job that turns a task into a version, and its two dispatchers.

- `worker.jobs`: `JobRunner` (the job and the loop that runs queued jobs in order).
- `worker.embedded`: `EmbeddedDispatcher`, a thread of the server process (embedded mode).
- `worker.celery_app`: `create_app`, `CeleryDispatcher` (deployed mode, Redis broker).
- `worker.dispatch`: `Dispatcher`, the interface the server enqueues through.
- `worker.dispatchers`: `make_dispatcher(settings, store)`, the one the settings name.
- `worker.settings`: `WorkerSettings` (the store's settings plus model and jobs).
- `worker.locking`: the update lock that lets one job run at a time.

Nothing is imported here: `worker.jobs` pulls in torch, the dispatchers need not.
"""
