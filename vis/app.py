"""The ConceptLens workbench: a Dash app built by a factory, served by Flask's dev server or gunicorn.

    >>> from store.settings import load_settings
    >>> from vis.app import create_app, AppConfig
    >>> app = create_app(load_settings("workspace"), config=AppConfig(store="demo"))
    >>> app.run(host="127.0.0.1", port=8050)           # or: python -m vis serve

Production (several workers; jobs on diskcache in the workspace, or Celery with CONCEPTLENS_CACHE_URL=redis://…):

    gunicorn -w 2 -b 127.0.0.1:8050 'vis.app:create_server()'

Nothing is loaded at import time: `create_app` builds the Dash app, attaches a `Workbench` (vis.services) to the
Flask server, and every callback reads by id from the store, the database and mlflow through it. The login layer
(vis.auth) wraps `app.server`: every route, callback and job endpoint goes through it, and every callback that reads
or writes annotations checks the user's membership of the review session it names.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["AppConfig", "app_config_from_env", "create_app", "create_server", "serve_main", "mlflow_ui_main"]

HERE = Path(__file__).resolve().parent
LABEL_RULES = ("published", "dataset", "assisted")


@dataclass(frozen=True)
class AppConfig:
    """What the app shows and how; every field has a default that serves the demo workspace.

    `model` is the model reference the app serves (Grad-CAM, the lesion overlay); a store extracted from another
    model is refused with a clear message. `None` serves the model named in the store's own attributes.
    """

    dataset: str = "demo"
    store: str = "demo"
    model: str | None = "models:/conceptlens-demo@champion"
    layer: str | None = None  # default: the deepest layer of the store
    debug: bool = False  # Dash dev tools and tracebacks: only with --debug
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    max_body_bytes: int = 1 << 20  # largest callback body (a drawn region of ~20 000 vertices fits)
    flagged_threshold: float = 0.5  # a patch is flagged when P(lesion) reaches this
    max_flagged: int = 16
    iou_threshold: float = 0.2  # units above it are highlighted (and labeled by the published rule)
    mask_level: float = 0.99  # activation quantile that thresholds a unit's map into its mask
    # "published": a drawing labels the units whose IoU with it is above iou_threshold (and above their label's);
    # "dataset": every drawing re-estimates each unit's dataset-level IoU with each drawn concept and labels by
    # Network Dissection's criterion (explain.labels.DatasetLabelRule; it measures better against ground truth),
    # with each unit's IoU with the film labels, background, skin and pectoral muscle as rivals to beat;
    # "assisted": the same with a probe of each drawn concept carrying the drawings over to every image showing it
    # (DatasetLabelRule(probes=True), explain.labelrules.ProbeAssistedRule: better still; seconds per drawing)
    label_rule: str = "published"

    def __post_init__(self):
        if self.label_rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {', '.join(LABEL_RULES)}, got {self.label_rule!r}")


def _secret_key(settings) -> str:
    """settings.secret_key, else <workspace>/secret_key, created once: the key is written to a private temporary
    file that is then hard-linked into place, so two workers starting together both read the same, whole key."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.workspace / "secret_key"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".secret_key-", dir=settings.workspace)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


def create_app(settings=None, *, config: AppConfig | None = None):
    """Build the Dash app for one workspace. `settings` defaults to `load_settings()` (CONCEPTLENS_WORKSPACE)."""
    import dash
    import dash_bootstrap_components as dbc  # noqa: F401  (imported so its component suite is registered)

    from store.settings import load_settings

    from . import components
    from .api import install_api
    from .auth import install_auth
    from .guard import install_guard
    from .jobs import create_manager
    from .services import EXTENSION, Workbench

    settings = (settings or load_settings()).ensure()
    config = config or AppConfig()
    app = dash.Dash(
        "vis",
        use_pages=True,
        pages_folder=str(HERE / "pages"),
        assets_folder=str(HERE / "assets"),
        assets_ignore=r"login\.css",  # the sign-in page's own stylesheet, served at /login.css by vis.auth
        serve_locally=True,  # no CDN: the app works on a closed network
        title="ConceptLens",
        update_title=None,
        suppress_callback_exceptions=True,  # pages are rendered on navigation, after the callbacks exist
        background_callback_manager=create_manager(settings),
        health_endpoint="health",
    )
    app.server.secret_key = _secret_key(settings)
    app.server.extensions[EXTENSION] = Workbench(settings, config)
    app.layout = components.shell
    components.install_shell(app)
    # Move the callbacks that the page modules registered with dash.callback into this app now, so that a second
    # app built in the same process (tests) gets its own copies instead of racing for them at first request.
    with app.server.test_request_context("/"):
        app._setup_server()
    # The login layer first: its before_request hook runs before anything else for every route, API included.
    install_auth(app, db_url=settings.database_url, demo_accounts=settings.workspace / "demo-accounts.txt")
    install_api(app)
    install_guard(app, max_body_bytes=config.max_body_bytes)
    if config.debug:
        app.enable_dev_tools(debug=True)
    return app


def warm(app):
    """Warm the app's Workbench before it serves (vis.services.Workbench.warm), printing what could not be opened
    on stderr; returns the app. Only the serving processes call it, not `create_app` (tests build many apps)."""
    from .services import EXTENSION

    for problem in app.server.extensions[EXTENSION].warm():
        print(f"ConceptLens: not ready yet: {problem}", file=sys.stderr, flush=True)
    return app


def prepare_process() -> None:
    """Process-wide set-up of a server or worker, before it builds the app (`create_server`, `python -m vis serve`,
    `python -m vis worker`; not `create_app`, which tests call many times in one process):

    - glibc's malloc arenas capped (`limit_malloc_arenas`);
    - mlflow's artifact-download progress bars off: a server's log is no terminal, and it got one for every model or
      ROC figure fetched (a value of MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR set by the user wins);
    - torch._dynamo imported now: torch.optim's first step pulls it in, and the first probe fit of every process
      waited about a second for it while the user did. Imported here, before any request thread or job process
      exists, never in a thread of its own: a job forked while another thread holds an import lock could hang on
      it. Background jobs forked from the server (diskcache) inherit the import.
    """
    limit_malloc_arenas()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import torch._dynamo  # noqa: F401


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process (Linux; elsewhere nothing happens).

    A threaded server gives each request thread its own arena by default; memory freed in one arena is rarely
    returned, so RSS creeps up with the number of threads ever used although the Python heap stays flat (measured
    in tests/benchmarks/bench_app.py). Two arenas keep it flat at no measurable cost here.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).mallopt(-8, int(arenas))  # M_ARENA_MAX
        except (OSError, AttributeError):
            pass


ENV_FIELDS = ("store", "dataset", "model", "label_rule")  # AppConfig fields that CONCEPTLENS_<FIELD> sets


def app_config_from_env(env=None, **overrides) -> AppConfig:
    """AppConfig with CONCEPTLENS_STORE / CONCEPTLENS_DATASET / CONCEPTLENS_MODEL applied (unset or empty: the
    default), then `overrides` (None values ignored). The one place every process of the app reads them: the
    gunicorn app (`create_server`), `python -m vis serve`, the Celery worker (`python -m vis worker`) and the team
    launcher, so background jobs run on the store and model the pages show.

        >>> app_config_from_env({"CONCEPTLENS_STORE": "team", "CONCEPTLENS_MODEL": "store"})
        AppConfig(dataset='demo', store='team', model=None, ...)

    A model of "store" means the model named in the store's own attributes (`model=None`).
    """
    env = os.environ if env is None else env
    values = {k: env.get(f"CONCEPTLENS_{k.upper()}") for k in ENV_FIELDS}
    values = {k: v for k, v in values.items() if v}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("model") == "store":
        values["model"] = None
    return replace(AppConfig(), **values)


def create_server(workspace: str | None = None):
    """The Flask server for gunicorn: `gunicorn -w 2 -b 127.0.0.1:8050 'vis.app:create_server()'`.

    The workspace comes from the argument or CONCEPTLENS_WORKSPACE; the store, dataset and model from
    CONCEPTLENS_STORE / _DATASET / _MODEL when set (`app_config_from_env`).
    """
    from store.settings import load_settings

    prepare_process()
    return warm(create_app(load_settings(workspace), config=app_config_from_env())).server


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--workspace", default=None, help="workspace directory (default: CONCEPTLENS_WORKSPACE or ./workspace)")
    p.add_argument("--host", default="127.0.0.1")
    return p


def serve_main(argv: list[str]) -> int:
    """`python -m vis serve [--host H] [--port P] [--store NAME] [--dataset NAME] [--model REF] [--debug]`."""
    from store.settings import load_settings

    p = _parser("python -m vis serve", "serve the workbench with the development server (see README for gunicorn)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--store", default=None, help="activation store (default: CONCEPTLENS_STORE or 'demo')")
    p.add_argument("--dataset", default=None, help="dataset (default: CONCEPTLENS_DATASET or 'demo')")
    p.add_argument("--model", default=None, help="model reference (default: CONCEPTLENS_MODEL or "
                                                  f"{AppConfig.model}); 'store' serves the store's own model")
    p.add_argument("--debug", action="store_true", help="Dash dev tools and tracebacks (never on a shared host)")
    args = p.parse_args(argv)
    config = app_config_from_env(store=args.store, dataset=args.dataset, model=args.model, debug=args.debug)
    prepare_process()
    app = warm(create_app(load_settings(args.workspace), config=config))
    print(f"ConceptLens: open http://{args.host}:{args.port}/", flush=True)
    app.run(host=args.host, port=args.port, debug=args.debug, dev_tools_hot_reload=False, threaded=True)
    return 0


def mlflow_ui_main(argv: list[str]) -> int:
    """`python -m vis mlflow-ui [--port 5000]`: the mlflow UI on the workspace's tracking store (loopback)."""
    from store.settings import load_settings

    p = _parser("python -m vis mlflow-ui", "start the mlflow UI on the workspace's tracking store")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    settings = load_settings(args.workspace).ensure()
    cmd = mlflow_ui_command(settings, host=args.host, port=args.port)
    print(f"mlflow UI on {settings.tracking_uri}: http://{args.host}:{args.port}/", flush=True)
    return subprocess.call(cmd)


def mlflow_ui_command(settings, *, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The command line `mlflow-ui` runs: the workspace's tracking URI and artifact root, bound to `host`."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.tracking_uri,
            "--default-artifact-root", settings.artifact_root.as_uri(), "--host", host, "--port", str(port)]
