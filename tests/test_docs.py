"""The offline docs site: `niff_docs` builds it from nbs/; every notebook has a page with its title, math, figures and
API entries; headless Chromium loads two pages with no console errors, no off-site requests and typeset math."""
import base64
import fcntl
import html
import importlib
import inspect
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'


# ---------------------------------------------------------------- the notebooks, read directly (not through niff_nb.docs)

def notebooks():
    "Every notebook of the site: nbs/**/*.ipynb, skipping names and folders that start with _ or . (as nbdev does)."
    return sorted(p for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


def cells(nb_path):
    return json.loads(nb_path.read_text(encoding='utf-8'))['cells']


def src(cell): return ''.join(cell['source'])


def title(nb_path):
    for c in cells(nb_path):
        if c['cell_type'] == 'markdown' and (m := re.search(r'^#\s+(\S.*?)\s*$', src(c), flags=re.M)): return m.group(1)


_hidden = re.compile(r'^#\|\s*(hide|export|exporti|include:\s*false|output:\s*false)\s*$', flags=re.M)

def n_figures(nb_path):
    "Image outputs a reader should see: stored in cells that neither nbdev nor Quarto options hide."
    return sum(any(k.startswith('image/') for k in o.get('data', {}))
               for c in cells(nb_path) if c['cell_type'] == 'code' and not _hidden.search(src(c))
               for o in c.get('outputs', []))


def has_math(nb_path):
    "Markdown cells with $...$ math, not counting code (fenced or `inline`)."
    for c in cells(nb_path):
        if c['cell_type'] != 'markdown': continue
        text = re.sub(r'```.*?```', '', src(c), flags=re.S)
        text = re.sub(r'`[^`]*`', '', text)
        if re.search(r'\$[^$\s][^$]*\$', text): return True
    return False


def exported_names(nb_path):
    "Public functions and classes a notebook exports (each should have a show_doc API entry)."
    m = next((re.search(r'^#\|\s*default_exp\s+(\S+)', src(c), flags=re.M) for c in cells(nb_path)
              if re.search(r'^#\|\s*default_exp\s', src(c), flags=re.M)), None)
    if not m: return []
    mod = importlib.import_module(f'niff_nb.{m.group(1)}')
    return [n for n in getattr(mod, '__all__', []) if (inspect.isfunction(o := getattr(mod, n)) or inspect.isclass(o))
            and o.__module__ == mod.__name__]


def main_html(page):
    "The article of a Furo page (no sidebar, no footer)."
    m = re.search(r'<article[^>]*role="main"[^>]*>(.*?)</article>', page, flags=re.S)
    assert m, 'no <article role="main"> in page'
    return m.group(1)


def text_of(fragment): return html.unescape(re.sub(r'<[^>]+>', '', fragment))


def plain(s):
    "Compare titles without markup: math delimiters, backticks and spacing."
    return ' '.join(re.sub(r'\\[()]|[$`]', '', s).split())


# ------------------------------------------------------------------------------------------------------ the build

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Build the site once with the documented command, into a temporary folder."
    dest = tmp_path_factory.mktemp('docs') / '_docs'
    exe = shutil.which('niff_docs')
    cmd = [exe] if exe else [sys.executable, '-c', 'import sys; from niff_nb.docs import niff_docs; niff_docs(sys.argv[1:])']
    t = time.perf_counter()
    r = subprocess.run(cmd + ['--dest', str(dest)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f'niff_docs failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    print(f'\nniff_docs built {dest} in {time.perf_counter() - t:.1f}s\n{r.stdout}')
    from niff_nb.docs import frontmatter, page_name  # page names as nbdev (Quarto) gives them
    pages = {}
    for nb in notebooks():
        proc = ROOT / '_proc' / nb.relative_to(NBS)
        pages[nb] = dest / (page_name(nb.relative_to(NBS).as_posix(), frontmatter(json.loads(proc.read_text()))) + '.html')
    return dest, pages, r.stdout


def test_every_notebook_has_a_page_with_its_title(site):
    dest, pages, _ = site
    assert pages, 'no notebooks found'
    assert pages[NBS / 'index.ipynb'] == dest / 'index.html'
    for nb, page in pages.items():
        assert page.exists(), f'{nb.name}: no page {page.name}'
        h1 = re.search(r'<h1>(.*?)<a class="headerlink"', main_html(page.read_text()), flags=re.S)
        assert h1 and plain(text_of(h1.group(1))) == plain(title(nb)), f'{page.name}: H1 {h1 and h1.group(1)!r} != {title(nb)!r}'


def test_index_page_is_the_readme(site):
    dest, _, _ = site
    text = ' '.join(text_of(main_html((dest / 'index.html').read_text())).split())
    readme = (ROOT / 'README.md').read_text()
    for heading in re.findall(r'^## (.+)$', readme, flags=re.M):
        assert heading in text, heading
    assert 'nbdev_test && pytest -q tests' in text


def test_math_is_marked_up_for_the_local_mathjax(site):
    dest, pages, _ = site
    assert (dest / '_static' / 'mathjax' / 'tex-chtml.js').stat().st_size > 100_000
    assert (dest / '_static' / 'mathjax' / 'output' / 'chtml' / 'fonts' / 'woff-v2').is_dir()
    for nb, page in pages.items():
        if not has_math(nb): continue
        h = page.read_text()
        assert '_static/mathjax/tex-chtml.js' in h, f'{page.name}: MathJax not loaded from the site'
        assert len(re.findall(r'class="math notranslate nohighlight"', h)) > 0, f'{page.name}: no math'
        assert not re.search(r'https?://[^"\']*(mathjax|katex)', h, flags=re.I), f'{page.name}: math from a CDN'


def test_figures(site):
    dest, pages, _ = site
    for nb, page in pages.items():
        imgs = re.findall(r'<img [^>]*src="([^"]+)"', main_html(page.read_text()))
        assert len(imgs) >= n_figures(nb), f'{page.name}: {len(imgs)} <img> for {n_figures(nb)} stored figures'
        for s in imgs: assert (page.parent / s).exists(), f'{page.name}: missing image {s}'


def test_api_entries_for_exported_functions(site):
    dest, pages, _ = site
    for nb, page in pages.items():
        h = page.read_text()
        for name in exported_names(nb):
            assert f'id="{name.lower()}"' in h, f'{page.name}: no API entry for {name}'


def test_links_stay_inside_the_site(site):
    dest, pages, _ = site
    for page in pages.values():
        for href in re.findall(r'href="([^"]+)"', main_html(page.read_text())):
            assert 'niff-nb.github.io' not in href, f'{page.name}: link to the hosted docs {href}'
            if href.startswith(('http', 'mailto:', '#')): continue
            target = (page.parent / href.split('#')[0]).resolve()
            assert target.exists(), f'{page.name}: broken link {href}'
            anchor = href.partition('#')[2]
            # a method (`Class.method`) has an anchor only where the notebook calls show_doc on it, in Quarto too
            if anchor and '.' not in anchor and target.suffix == '.html':
                assert f'id="{anchor}"' in target.read_text(), f'{page.name}: broken anchor {href}'


def test_navigation_lists_the_chapters_in_order(site):
    dest, pages, _ = site
    side = re.search(r'<div class="sidebar-tree">(.*?)</aside>', (dest / 'index.html').read_text(), flags=re.S).group(1)
    hrefs = re.findall(r'<li class="toctree-l1[^"]*"><a class="reference internal" href="([^"#]+)"', side)
    # nbdev's order: notebooks of nbs/ by name, then each sub-folder as a section
    nbs = sorted((p for p in pages if p.name != 'index.ipynb'), key=lambda p: (p.parent != NBS, p.parent, p.name))
    assert hrefs == [pages[p].relative_to(dest).as_posix() for p in nbs]


def test_command_reports_pages_and_time(site):
    _, pages, out = site
    assert re.search(rf'^{len(pages)} pages in .*total \d+\.\ds', out, flags=re.M), out
    for page in pages.values(): assert f'{page.name}  <-  nbs/' in out


def test_bad_dest_is_refused(tmp_path):
    (tmp_path / 'notes.txt').write_text('keep me')
    r = subprocess.run([sys.executable, '-c', 'import sys; from niff_nb.docs import niff_docs; niff_docs(sys.argv[1:])',
                        '--dest', str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'does not look like a docs build' in r.stderr
    assert (tmp_path / 'notes.txt').read_text() == 'keep me'


# ------------------------------------------------------------------------ headless Chromium over the DevTools pipe

CHROMIUM = shutil.which('chromium')
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-default-apps',
                  '--hide-scrollbars', '--mute-audio']


class Chromium:
    "Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no port, no driver."
    def __init__(self, user_data_dir, timeout=30):
        r_cmd, w_cmd = os.pipe()   # we write commands; Chromium reads them on its fd 3
        r_evt, w_evt = os.pipe()   # Chromium writes replies and events on its fd 4; we read them
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r_cmd, w_evt))  # >= 10: `3<&a 4>&b` cannot collide
        os.close(r_cmd); os.close(w_evt)
        self.proc = subprocess.Popen(['bash', '-c', f'exec "$0" "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-', CHROMIUM, *CHROMIUM_FLAGS,
                                      f'--user-data-dir={user_data_dir}', '--remote-debugging-pipe', 'about:blank'],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(a, b))
        os.close(a); os.close(b)
        self.w, self.r, self.buf, self.n, self.events, self.timeout = w_cmd, r_evt, b'', 0, [], timeout

    def _read(self, deadline):
        while b'\0' not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]: raise TimeoutError('Chromium did not answer')
            chunk = os.read(self.r, 1 << 20)
            if not chunk: raise RuntimeError('Chromium closed the DevTools pipe')
            self.buf += chunk
        msg, self.buf = self.buf.split(b'\0', 1)
        return json.loads(msg)

    def send(self, method, session=None, **params):
        self.n += 1
        msg = {'id': self.n, 'method': method, 'params': params, **({'sessionId': session} if session else {})}
        os.write(self.w, json.dumps(msg).encode() + b'\0')
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get('id') == self.n:
                if 'error' in m: raise RuntimeError(f'{method}: {m["error"]}')
                return m.get('result', {})
            self.events.append(m)

    def wait_event(self, method, session):
        deadline = time.monotonic() + self.timeout
        if any(e.get('method') == method and e.get('sessionId') == session for e in self.events): return
        while True:
            m = self._read(deadline)
            self.events.append(m)
            if m.get('method') == method and m.get('sessionId') == session: return

    def close(self):
        try: self.send('Browser.close')
        except Exception: pass
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        for fd in (self.w, self.r): os.close(fd)


PAGE_STATE = '''(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const math = [...document.querySelectorAll('.math')];
  return {title: document.title, text: document.body.innerText.length, math: math.length,
          typeset: document.querySelectorAll('mjx-container').length,
          untypeset: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60)),
          images: document.images.length,
          broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)};
})()'''


def load(browser, url, shot, width=1280, height=1400):
    "Open `url` in a new tab; return the page state, console errors and off-site requests; save a PNG to `shot`."
    tid = browser.send('Target.createTarget', url='about:blank')['targetId']
    sid = browser.send('Target.attachToTarget', targetId=tid, flatten=True)['sessionId']
    for domain in ('Page', 'Runtime', 'Log', 'Network'): browser.send(f'{domain}.enable', session=sid)
    browser.send('Emulation.setDeviceMetricsOverride', session=sid, width=width, height=height, deviceScaleFactor=1, mobile=False)
    browser.send('Page.navigate', session=sid, url=url)
    browser.wait_event('Page.loadEventFired', sid)
    state = browser.send('Runtime.evaluate', session=sid, expression=PAGE_STATE, awaitPromise=True,
                         returnByValue=True)['result']['value']
    time.sleep(0.3)  # let fonts and layout settle before the picture
    shot.write_bytes(base64.b64decode(browser.send('Page.captureScreenshot', session=sid, format='png')['data']))
    origin, errors, offsite = url.split('/', 3)[:3], [], []
    for e in browser.events:
        if e.get('sessionId') != sid: continue
        m, p = e.get('method'), e.get('params', {})
        if m == 'Runtime.exceptionThrown':
            d = p['exceptionDetails']; errors.append(d.get('exception', {}).get('description') or d['text'])
        elif m == 'Runtime.consoleAPICalled' and p['type'] in ('error', 'assert'):
            errors.append(' '.join(str(a.get('value', a.get('description', ''))) for a in p['args']))
        elif m == 'Log.entryAdded' and p['entry']['level'] == 'error':
            errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == 'Network.requestWillBeSent':
            u = p['request']['url']
            if u.split('/', 3)[:3] != origin and not u.startswith(('data:', 'blob:', 'about:')): offsite.append(u)
        elif m == 'Network.loadingFailed' and not p.get('canceled'):
            errors.append(f"failed to load: {p.get('errorText')}")
    browser.send('Target.closeTarget', targetId=tid)
    return state, errors, offsite


def is_blank(png):
    "Nearly one colour: more than 97% of the pixels share the most common grey level, or fewer than 20 colours."
    from PIL import Image
    img = Image.open(png).convert('RGB')
    hist = img.convert('L').histogram()
    return max(hist) / sum(hist) > 0.97 or len(img.getcolors(1 << 24)) < 20


@pytest.fixture(scope='module')
def served(site):
    "The built site on a local HTTP server (127.0.0.1, a free port), for the duration of the module."
    dest = site[0]
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(Quiet, directory=str(dest)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_port}/'
    httpd.shutdown(); httpd.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason='chromium is not installed (Debian: apt-get install chromium)')
def test_pages_in_headless_chromium(site, served, tmp_path_factory):
    dest, pages, _ = site
    chapter = next(p for nb, p in pages.items() if nb.name != 'index.ipynb' and has_math(nb) and n_figures(nb))
    shots = tmp_path_factory.mktemp('screenshots')
    browser = Chromium(tmp_path_factory.mktemp('chromium-profile'))
    try:
        for page in (dest / 'index.html', chapter):
            rel = page.relative_to(dest).as_posix()
            shot = shots / (rel.replace('/', '_') + '.png')
            state, errors, offsite = load(browser, served + rel, shot)
            print(f'{rel}: {state} -> {shot}')
            assert not errors, f'{rel}: console errors {errors}'
            assert not offsite, f'{rel}: requests leave the machine {offsite}'
            assert not is_blank(shot), f'{rel}: blank screenshot {shot}'
            assert state['text'] > 500, f'{rel}: almost no text {state}'
            assert not state['broken_images'], f'{rel}: images that did not load {state["broken_images"]}'
            assert not state['untypeset'], f'{rel}: math MathJax did not typeset {state["untypeset"]}'
            if page == chapter: assert state['math'] > 0 and state['typeset'] >= state['math'] and state['images'] >= n_figures(
                next(nb for nb, p in pages.items() if p == chapter)), f'{rel}: {state}'
    finally:
        browser.close()
