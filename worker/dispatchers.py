"""`make_dispatcher`: the dispatcher the settings name. It sits above `worker.dispatch`
(the interface) and the two implementations, which import that interface; each is
imported only when chosen (Celery and torch are heavy)."""

from __future__ import annotations

from store.service import Store
from worker.dispatch import Dispatcher
from worker.settings import WorkerSettings


def make_dispatcher(settings: WorkerSettings, store: Store) -> Dispatcher:
    """The dispatcher `settings.dispatcher` names, not started."""
    if settings.dispatcher == "celery":
        from worker.celery_app import CeleryDispatcher

        return CeleryDispatcher(settings, store)
    from worker.embedded import EmbeddedDispatcher

    return EmbeddedDispatcher(settings, store)
