"""A reader's view: the notebooks in JupyterLab, in a real (headless) browser.

nbval proves that cells run; this proves that a reader sees them. It starts JupyterLab from this
environment on a loopback port, over a temporary COPY of notebooks/ (so nothing a run saves touches
the repository), drives Debian's Chromium through Playwright (Playwright's own browser download is
not available on our machines), runs RUN in full and opens every other notebook. It fails on an
error output, a cell that did not run, a widget that does not render, or a plot that does not show,
and saves a screenshot (also to $TINYSERVE_ARTIFACTS when set). Without chromium or playwright it
skips and says why (`.ci/run` installs chromium with apt).
"""
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
# Run in full: the quickstart (the real model), and the widget notebook whose cells run fastest
# (01: timed beside 02-06 on one machine, its cells took under half the time of any of theirs).
RUN = ("00_quickstart.ipynb", "01_memory_bound.ipynb")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# An error output reaches the page as stderr text (JupyterLab renders `error` outputs with the
# stderr renderer), so tell a traceback from a warning or a progress line by its text.
ERROR_RE = re.compile(r"Traceback \(most recent call last\)|^\s*Cell In\[\d+\]|Javascript Error"
                      r"|^(\w+\.)*\w*(Error|Exception)(:|\s*$)", re.M)
# A cell that builds a widget at top level (not inside a def): interact, interactive, display(w).
WIDGET_RE = re.compile(r"^(\w+\s*=\s*)?(widgets\.)?(interact|interact_manual|interactive)\b"
                       r"|^display\(.*(widget|interactive)", re.M)
PLOT_RE = re.compile(r"^(?![ \t#])[^\n]*\bplt\.show\(\)", re.M)   # plt.show() at top level
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
KERNEL_S, RUN_S, LAB_S = 90, 240, 90        # bounds on each wait, not expected times


def _skip(reason):
    # A skip's reason is hidden without -rs; a warning always reaches the summary.
    warnings.warn(f"browser test skipped: {reason}", UserWarning, stacklevel=2)
    pytest.skip(reason)


def _chromium():
    exe = os.environ.get("TINYSERVE_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not exe:
        _skip("no `chromium` executable (Debian: apt-get install chromium; or set TINYSERVE_CHROMIUM)")
    return exe


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on 127.0.0.1 over a temporary copy of notebooks/."""

    def __init__(self, root):
        jupyter = Path(sys.executable).parent / "jupyter"   # the environment running the tests
        for mod in ("jupyterlab", "ipywidgets"):
            if not _has(mod):
                _skip(f"{mod} is not installed (pip install -e '.[notebooks]')")
        if not jupyter.exists():
            _skip(f"no {jupyter}")
        self.nbdir = root / "notebooks"
        shutil.copytree(NB_DIR, self.nbdir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        settings = root / "settings"
        # windowingMode none: every cell stays in the DOM, so cell i of the page is cell i of the
        # file; no news toast over the page; the notary key stays out of $HOME.
        _write(settings / "@jupyterlab/notebook-extension/tracker.jupyterlab-settings",
               {"windowingMode": "none"})
        _write(settings / "@jupyterlab/apputils-extension/notification.jupyterlab-settings",
               {"fetchNews": "false", "checkForUpdates": False})
        (root / "notary").mkdir()
        self.token, port = secrets.token_hex(16), _free_port()
        self.base = f"http://127.0.0.1:{port}"
        cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.nbdir}",
               f"--NotebookNotary.data_dir={root / 'notary'}"]
        if os.geteuid() == 0:                 # CI containers run as root; lab refuses without this
            cmd.append("--allow-root")
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"),
                   JUPYTER_RUNTIME_DIR=str(root / "runtime"))
        env.pop("TRITON_INTERPRET", None)     # conftest sets it for pytest; a reader's lab has none
        # The kernel shares the 2 cores with the browser and the server: torch's spinning threads
        # made 00 run 4x slower that way (280 s of CPU, not 70). Only printed timings change.
        env.setdefault("OMP_NUM_THREADS", "1")
        self.log = root / "lab.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.kernel_pids = set()
        deadline = time.monotonic() + LAB_S
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"jupyter lab exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.api("GET", "/api/status")
                return
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"jupyter lab not up after {LAB_S} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def api(self, method, path):
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n=40):
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def shutdown_kernel(self, name):
        """Shut down the kernel behind notebook `name` (kernels run in their own sessions, so the
        server's process group does not hold them)."""
        with contextlib.suppress(OSError):
            for s in self.api("GET", "/api/sessions"):
                if s["path"].endswith(name):
                    self.api("DELETE", f"/api/sessions/{s['id']}")

    def stop(self):
        self.kernel_pids |= _children(self.proc.pid)
        with contextlib.suppress(OSError):
            self.api("POST", "/api/shutdown")          # stops the kernels, then the server
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pid in self.kernel_pids:                   # any kernel the server left behind
            with contextlib.suppress(OSError):
                if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def _has(mod):
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _children(pid):
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(stat.parent.name))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    exe = _chromium()
    if not _has("playwright"):
        _skip("python package `playwright` is not installed (pip install -e '.[dev]')")
    server = Lab(tmp_path_factory.mktemp("lab"))
    try:
        server.chromium = exe
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright
    pw, browser = sync_playwright().start(), None
    try:
        browser = pw.chromium.launch(executable_path=lab.chromium, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.js_errors = []
        pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
        pg.goto(f"{lab.base}/lab?reset&token={lab.token}", timeout=LAB_S * 1000)
        pg.wait_for_selector(".jp-DirListing-item", timeout=LAB_S * 1000)
        yield pg
    finally:
        if browser:
            with contextlib.suppress(Exception):
                browser.close()
        pw.stop()


def _menu(page, menu, item):
    page.locator(".lm-MenuBar-item", has_text=menu).first.click()
    page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel", has_text=re.compile(
        f"^{re.escape(item)}$")).click()


def _open(page, lab, name, ncells):
    """Open `name` through File > Open from Path; return its panel once every cell is drawn
    and its kernel is idle."""
    _menu(page, "File", "Open from Path…")
    page.locator(".jp-Dialog input").fill(name)
    page.locator(".jp-Dialog input").press("Enter")
    tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current",
                       has_text=re.compile(f"^{re.escape(name)}"))
    tab.wait_for(timeout=KERNEL_S * 1000)
    panel = page.locator(f"[id='{tab.get_attribute('data-id')}']")
    page.wait_for_function(
        "([el, n]) => el.querySelectorAll('.jp-Notebook .jp-Cell').length >= n",
        arg=[panel.element_handle(), ncells], timeout=KERNEL_S * 1000)
    # The page shows "idle" before its kernel exists, and Run All without a kernel does nothing:
    # wait for the server to report this notebook's kernel idle too.
    deadline = time.monotonic() + KERNEL_S
    while not any(s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle"
                  for s in lab.api("GET", "/api/sessions")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no idle kernel for {name} after {KERNEL_S} s")
        time.sleep(0.5)
    panel.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for(
        timeout=KERNEL_S * 1000)
    return panel


def _run_all(page, panel, code_cells):
    """Clear every output, Run All, and wait until the kernel is idle with no cell queued: either
    every non-empty code cell has its execution count, or the run stopped at an error."""
    _menu(page, "Edit", "Clear Outputs of All Cells")
    _menu(page, "Run", "Run All Cells")
    deadline, settled, started = time.monotonic() + RUN_S, 0, False
    while time.monotonic() < deadline:
        time.sleep(1)
        prompts = panel.evaluate("el => [...el.querySelectorAll('.jp-Notebook .jp-Cell')].map("
                                 "c => (c.querySelector('.jp-InputArea-prompt') || {}).textContent)")
        ran = [re.fullmatch(r"\[\d+\]:", (prompts[i] or "").strip()) for i in code_cells]
        if all(ran) or page.locator(".jp-Dialog:visible").count():   # done, or a dead kernel's
            return                                                     # dialog: _problems says
        started = started or any(ran) or any("[*]" in (p or "") for p in prompts)
        if not started and time.monotonic() > deadline - RUN_S + 30:
            raise TimeoutError("Run All started no cell within 30 s")
        idle = panel.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').count()
        queued = any("[*]" in (p or "") for p in prompts)
        settled = settled + 1 if idle and not queued and any(ran) else 0
        if settled >= 3:            # idle for 3 s with cells never run: the run stopped at an error
            return
    raise TimeoutError(f"Run All did not finish within {RUN_S} s")


# What each cell shows: its prompt, its error-looking stderr, loaded PNGs, widget views (and
# whether each rendered or shows "model not found"), and its other visible outputs.
_CELL_JS = """el => [...el.querySelectorAll('.jp-Notebook .jp-Cell')].map(c => {
  const outs = [...c.querySelectorAll('.jp-OutputArea-output')];
  const mime = m => outs.filter(o => o.getAttribute('data-mime-type') === m);
  const top = outs.filter(o => !o.closest('.widget-output'));   // not inside a widget's Output
  // a widget view (JupyterLab gives it no data-mime-type), its "model not found" placeholder,
  // or the text/plain repr shown when no widget manager renders it
  const isWidget = o => o.classList.contains('jupyter-widgets')
      || !!o.querySelector(':scope > .jupyter-widgets')
      || /^(interactive|[A-Z]\\w+)\\(children=/.test(o.innerText.trim());
  return {
    prompt: ((c.querySelector('.jp-InputArea-prompt') || {}).textContent || '').trim(),
    markdown: c.classList.contains('jp-MarkdownCell')
              ? !!c.querySelector('.jp-RenderedMarkdown') : null,
    stderr: mime('application/vnd.jupyter.stderr').map(o => o.innerText),
    pngs: mime('image/png').map(o => [...o.querySelectorAll('img')].some(
              i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0)),
    widgets: top.filter(isWidget).map(o => ({
      text: o.innerText.slice(0, 200),
      view: !!o.querySelector(':scope > .jupyter-widgets'),
      controls: o.querySelectorAll('.widget-slider, .widget-dropdown, .widget-toggle-buttons, '
                                   + '.widget-checkbox, .widget-text, .widget-button').length,
      shown: [...o.querySelectorAll('.widget-output .jp-OutputArea-output')].some(
              x => x.innerText.trim() || x.querySelector('img')),
    })),
    // what a saved copy shows beside the widget: text or a picture, not an object's repr
    // ("<function f at 0x...>", which `interact` returns when the line has no semicolon)
    statics: top.filter(o => !isWidget(o) && (o.querySelector('img')
        || (o.innerText.trim() && !/^<[^>]* at 0x[0-9a-f]+>$/.test(o.innerText.trim())))).length,
  };
})"""


def _problems(page, panel, nb, ran):
    cells, shown = nb["cells"], panel.evaluate(_CELL_JS)
    if len(shown) != len(cells):
        return [f"page shows {len(shown)} cells, the file has {len(cells)}"]
    problems = [f"dialog: {t!r}" for t in page.locator(".jp-Dialog:visible").all_inner_texts()]
    for i, (cell, s) in enumerate(zip(cells, shown)):
        src = "".join(cell["source"])
        saved = [o.get("data", {}) for o in cell.get("outputs", [])]
        if s["markdown"] is False:
            problems.append(f"c{i}: markdown not rendered")
        for text in s["stderr"]:
            if ERROR_RE.search(text):
                problems.append(f"c{i}: error output: ...{text.strip()[-300:]}")
        if cell["cell_type"] != "code":
            continue
        if ran and src.strip() and not re.fullmatch(r"\[\d+\]:", s["prompt"]):
            problems.append(f"c{i}: did not run (prompt {s['prompt']!r})")
            continue
        if not any(s["pngs"]):
            if any("image/png" in d for d in saved):
                problems.append(f"c{i}: plot not shown (the saved notebook has one here)")
            elif ran and PLOT_RE.search(src):
                problems.append(f"c{i}: plot not shown (the cell calls plt.show())")
        makes_widget = bool(WIDGET_RE.search(src)) or any(WIDGET_MIME in d for d in saved)
        if not makes_widget:
            continue
        views = [w for w in s["widgets"] if w["view"] and "model not found" not in w["text"]]
        if ran:
            if not views:
                problems.append(f"c{i}: widget did not render: {s['widgets']}")
            elif not any(w["controls"] and w["shown"] for w in views):
                problems.append(f"c{i}: widget has no controls or shows no output: {views}")
        elif not views and not s["statics"]:    # a saved notebook has no live widget models
            problems.append(f"c{i}: opened, the widget cell shows only the widget's placeholder: "
                            "no static output beside it")
    return problems


@contextlib.contextmanager
def _screenshot_on_failure(page, name, tmp_path):
    try:
        yield
    except BaseException as e:
        if isinstance(e, pytest.skip.Exception):
            raise
        path = tmp_path / f"{Path(name).stem}.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(path))
            print(f"screenshot: {path}")
            if os.environ.get("TINYSERVE_ARTIFACTS"):
                out = Path(os.environ["TINYSERVE_ARTIFACTS"])
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, out / path.name)
                print(f"screenshot: {out / path.name}")
        if page.js_errors:
            print("page errors:", *page.js_errors[-5:], sep="\n  ")
        raise


def _check(page, lab, name, tmp_path, run):
    nb = json.loads((lab.nbdir / name).read_text())
    code = [i for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    try:
        with _screenshot_on_failure(page, name, tmp_path):
            panel = _open(page, lab, name, len(nb["cells"]))
            if run:
                _run_all(page, panel, code)
            problems, deadline = _problems(page, panel, nb, run), time.monotonic() + 10
            while problems and time.monotonic() < deadline:   # give late widgets/images a moment
                time.sleep(2)
                problems = _problems(page, panel, nb, run)
            if problems:
                first = re.match(r"c(\d+):", problems[0])
                if first:
                    panel.locator(".jp-Notebook .jp-Cell").nth(int(first[1])) \
                         .scroll_into_view_if_needed()
                pytest.fail(f"{name} in JupyterLab:\n  " + "\n  ".join(problems), pytrace=False)
    finally:
        lab.shutdown_kernel(name)


@pytest.mark.parametrize("name", RUN)
def test_notebook_runs_in_lab(page, lab, name, tmp_path, request):
    assert name in NOTEBOOKS, f"RUN names {name}, which is not in notebooks/"
    # each was chosen for its widgets (00 also for the real model): a run without one checks less
    src = (NB_DIR / name).read_text()
    assert WIDGET_RE.search("\n".join("".join(c["source"]) for c in json.loads(src)["cells"])), \
        f"{name} creates no widget: RUN should name a notebook that does"
    if name.startswith("00_"):
        request.getfixturevalue("smollm2_file")        # skips (with the reason) if not fetched
    _check(page, lab, name, tmp_path, run=True)


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n not in RUN])
def test_notebook_opens_in_lab(page, lab, name, tmp_path):
    _check(page, lab, name, tmp_path, run=False)
