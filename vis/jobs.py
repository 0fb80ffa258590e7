"""Background-callback managers: diskcache inside the workspace by default, Celery on Redis in the team setup.

    >>> from vis.jobs import create_manager
    >>> manager = create_manager(settings)      # DiskcacheManager under <workspace>/cache/jobs, or CeleryManager
    >>> Dash(..., background_callback_manager=manager)

`settings.cache_url` chooses: "diskcache" (the embedded default) or `redis://host:port/db` (Celery with Redis as
broker and result backend). With Celery, jobs run in a worker started by `python -m vis worker`, which builds the
same app so that every background callback is registered as a Celery task under the same name.
"""

from __future__ import annotations

import argparse

__all__ = ["create_manager", "is_celery", "worker_main", "JOB_EXPIRE_S"]

# Finished job results are small (a message, a run id); an hour is long enough for a slow browser to collect them.
JOB_EXPIRE_S = 3600


def is_celery(settings) -> bool:
    """True when the settings select the team setup (Celery with Redis) for background jobs."""
    return settings.cache_url.startswith(("redis://", "rediss://"))


def create_manager(settings):
    """The background-callback manager that `settings.cache_url` selects (see the module docstring)."""
    if is_celery(settings):
        from celery import Celery
        from dash import CeleryManager

        celery_app = Celery("conceptlens", broker=settings.cache_url, backend=settings.cache_url)
        # One task at a time per worker process and no prefetching: retrains are seconds long and must not queue
        # behind each other in one process while another worker idles.
        celery_app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True, result_expires=JOB_EXPIRE_S,
                               broker_connection_retry_on_startup=True)
        return CeleryManager(celery_app, expire=JOB_EXPIRE_S)
    import diskcache
    from dash import DiskcacheManager

    directory = settings.cache_dir / "jobs"
    directory.mkdir(parents=True, exist_ok=True)
    return DiskcacheManager(diskcache.Cache(str(directory)), expire=JOB_EXPIRE_S)


def worker_main(argv: list[str]) -> int:
    """`python -m vis worker [--workspace DIR] [--concurrency N] [--pool P] [--hostname NAME]`: the Celery worker
    for the app's background jobs (team setup: CONCEPTLENS_CACHE_URL=redis://…).

    It builds the same app as the pages (`vis.app.app_config_from_env`: CONCEPTLENS_STORE / _DATASET / _MODEL), so
    every background callback is registered under the same task name and runs on the store and model the pages
    show. `--hostname` names the worker's node (`python -m vis team` pings it by that name).
    """
    from store.settings import load_settings

    from .app import app_config_from_env, create_app, prepare_process

    p = argparse.ArgumentParser(prog="python -m vis worker", description=worker_main.__doc__.split("\n\n")[0])
    p.add_argument("--workspace", default=None, help="workspace directory (default: CONCEPTLENS_WORKSPACE or ./workspace)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="prefork", help="celery pool: prefork (default) or solo")
    p.add_argument("--hostname", default=None, help="the worker's node name (default: Celery's, celery@<host>)")
    p.add_argument("--loglevel", default="INFO")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    settings = load_settings(args.workspace).ensure()
    if not is_celery(settings):
        p.error(f"CONCEPTLENS_CACHE_URL={settings.cache_url!r}: a worker is only needed with redis:// (Celery)")
    prepare_process()
    app = create_app(settings, config=app_config_from_env())
    celery_app = app._background_manager.handle  # the CeleryManager's app, with every background task registered
    celery_args = ["worker", f"--loglevel={args.loglevel}", f"--concurrency={args.concurrency}", f"--pool={args.pool}"]
    if args.hostname:
        celery_args.append(f"--hostname={args.hostname}")
    celery_app.worker_main(celery_args)
    return 0
