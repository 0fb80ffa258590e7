"""Print a self-contained HTML document to PDF with headless Chromium (the session report's PDF).

    >>> from vis.pdf import find_chromium, html_to_pdf
    >>> find_chromium()                                   # CONCEPTLENS_CHROMIUM, else /usr/bin/chromium; None if absent
    '/usr/bin/chromium'
    >>> pdf = html_to_pdf(session_report_html(wb, 1))     # bytes starting with b"%PDF"

Chromium runs once per document, in a fresh temporary profile and home directory that are deleted afterwards,
without network (no DNS, no background requests, no component updates, no sync: the report is one file with its
images inline), with a time limit; the whole process group is killed when it runs over. At most `MAX_PRINTERS`
print at once per app process, so a burst of downloads cannot fork a browser per request. Pages, margins, the
running footer and page breaks come from the document's own print CSS (`@page`, vis.export).

Which browser: `CONCEPTLENS_CHROMIUM` (a path or a command name) when set, and nothing else then, so a wrong value
is reported rather than silently replaced; otherwise Debian's `/usr/bin/chromium`. Without one, `PdfUnavailable`
names what is missing (the API answers 501).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from .errors import VisError

__all__ = ["find_chromium", "html_to_pdf", "chromium_command", "missing_message", "PdfUnavailable", "PdfError",
           "CHROMIUM_ENV", "DEFAULT_CHROMIUM", "CHROMIUM_FLAGS", "PRINT_TIMEOUT_S", "MAX_PRINTERS"]

CHROMIUM_ENV = "CONCEPTLENS_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
                  "--disable-dev-shm-usage", "--mute-audio",
                  # nothing to fetch: every host name fails to resolve, so even a stray URL goes nowhere
                  "--host-resolver-rules=MAP * ~NOTFOUND")
PRINT_TIMEOUT_S = 90.0  # a report of 48 images prints in a few seconds; a hung browser is killed after this
MAX_PRINTERS = 2  # browsers printing at once in one app process
_SLOTS = threading.BoundedSemaphore(MAX_PRINTERS)


class PdfUnavailable(VisError, LookupError):
    """No Chromium to print with; the message says which path was looked at and how to provide one."""


class PdfError(VisError, RuntimeError):
    """Chromium ran but produced no PDF (crashed, timed out); the message holds the end of its output."""


def find_chromium(env=None) -> str | None:
    """The Chromium executable to print with: CONCEPTLENS_CHROMIUM (a path, or a name on PATH) when set, else
    /usr/bin/chromium; None when that is not an executable file."""
    env = os.environ if env is None else env
    wanted = env.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    path = wanted if os.sep in wanted else shutil.which(wanted)
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


def missing_message(env=None) -> str:
    """What a user reads when no Chromium is found: what was looked for, and the two ways to fix it."""
    env = os.environ if env is None else env
    if env.get(CHROMIUM_ENV):
        where = f"{CHROMIUM_ENV}={env[CHROMIUM_ENV]!r} is not an executable file"
    else:
        where = f"no Chromium at {DEFAULT_CHROMIUM}"
    return (f"PDF export needs headless Chromium on the server: {where}. Install Debian's chromium "
            f"(apt-get install chromium) or set {CHROMIUM_ENV} to a Chromium or Chrome executable. The HTML report "
            f"works without it.")


def chromium_command(chromium: str, *, profile: Path, html_path: Path, pdf_path: Path) -> list[str]:
    """The command line that prints `html_path` to `pdf_path` (no browser header or footer: the document's
    own @page rules draw the footer)."""
    return [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--no-pdf-header-footer",
            f"--print-to-pdf={pdf_path}", html_path.as_uri()]


def html_to_pdf(html: str, *, chromium: str | None = None, timeout: float = PRINT_TIMEOUT_S) -> bytes:
    """The PDF (bytes) of one self-contained HTML document. PdfUnavailable without Chromium; PdfError when the
    browser fails or runs past `timeout` seconds (its process group is killed)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise PdfUnavailable(missing_message())
    with _SLOTS, tempfile.TemporaryDirectory(prefix="conceptlens-pdf-") as tmp:
        tmp = Path(tmp)
        html_path, pdf_path, home = tmp / "report.html", tmp / "report.pdf", tmp / "home"
        home.mkdir()
        html_path.write_text(html, encoding="utf-8")
        # its own home and caches: nothing of the server's user is read or left behind
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(tmp)}
        cmd = chromium_command(chromium, profile=tmp / "profile", html_path=html_path, pdf_path=pdf_path)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise PdfError(f"Chromium did not finish printing within {timeout:.0f} s") from None
        finally:
            # the browser's helper processes (zygote, utility) must not outlive the print
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        data = pdf_path.read_bytes() if pdf_path.is_file() else b""
        if proc.returncode != 0 or not data.startswith(b"%PDF"):
            tail = (out or b"").decode(errors="replace").strip().splitlines()[-6:]
            raise PdfError(f"Chromium ({chromium}) exited with {proc.returncode} and wrote "
                           f"{'no PDF' if not data else 'something that is not a PDF'}: " + " | ".join(tail))
        return data
