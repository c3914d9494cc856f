"""The cloudlet panels of the all-in-one's Horizon in a real browser (headless Chromium driven by
selenium), as a user clicks through them after tools/aio/e2e.sh (whose Nova-made base package,
$AIO_DIR/e2e/e2e-base.cbase, it imports):

  member of project demo: log in -> import the package (upload with the progress bar) -> launch
  an instance from the base -> create an overlay of it -> synthesize it -> the synthesis page's
  timeline chart (>= 1 stage bar with a numeric duration); page loads of the tables (median of
  10), Synthesize -> ACTIVE in the browser
  member of project alt_demo: none of it on any panel, nor at A's detail URLs.

Every wait is bounded and fails with what it waited for, a screenshot and the page's HTML.
Screenshots of each panel: $CLOUDLET_ARTIFACTS (default artifacts/browser/ in the checkout).
Run it with tools/aio/browser.sh (the all-in-one's venv has selenium).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

T = TypeVar("T")
CHECKOUT = Path(__file__).resolve().parents[2]
AIO_DIR = Path(os.environ.get("AIO_DIR", "/opt/cloudlet-aio"))
USERS = {"demo": "demopass", "alt_demo": "alt_demopass"}
FLAVOR = "cloudlet.small"  # e2e.sh's flavor (256 MiB, the test guest's memory)
NUMBER = re.compile(r"\d+(\.\d+)?")


class Failure(Exception):
    """A step of the flow did not happen: the message says which, and where its evidence is."""


class Browser:
    """One headless Chromium with the flags a closed network needs (no background fetches, no
    component updates, no sync, a fresh profile) and helpers that fail loudly."""

    def __init__(self, url: str, shots: Path) -> None:
        self.url = url.rstrip("/")
        self.shots = shots
        self.profile = tempfile.mkdtemp(prefix="cloudlet-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                     f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.driver.set_page_load_timeout(120)

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def fail(self, message: str) -> Failure:
        slug = re.sub(r"[^a-z0-9]+", "-", message.lower())[:60].strip("-")
        try:
            png = self.shot(f"FAILED-{slug}")
            (self.shots / f"FAILED-{slug}.html").write_text(self.driver.page_source)
            where = f" (at {self.driver.current_url}; screenshot {png})"
        except WebDriverException as e:
            where = f" (no screenshot: {e.msg})"
        return Failure(message + where)

    def wait(self, what: str, check: Callable[[], T | None], timeout: float,
             reload: bool = False, every: float = 1.0) -> T:
        """check() until it returns something; reload the page between tries if asked."""
        deadline = time.monotonic() + timeout
        while True:
            self.no_error_shown()
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise self.fail(f"{what}: not within {timeout:.0f} s")
            time.sleep(every)
            if reload:
                self.driver.refresh()

    def no_error_shown(self) -> None:
        """The happy path shows no traceback and no Horizon error message."""
        source = self.driver.page_source
        if "Traceback (most recent call last)" in source or "Server error" in self.driver.title:
            raise self.fail("the page shows a server error")
        for alert in self.driver.find_elements(By.CSS_SELECTOR, ".alert-danger, .alert-error"):
            if alert.is_displayed() and alert.text.strip():
                raise self.fail(f"the page shows an error: {alert.text.strip()!r}")

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)
        self.no_error_shown()

    def find(self, css: str) -> WebElement | None:
        found = [e for e in self.driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return found[0] if found else None

    def login(self, user: str) -> None:
        self.open("/auth/login/")
        self.wait("the login form", lambda: self.find("#id_username"), 60)
        self.find("#id_username").send_keys(user)
        self.find("#id_password").send_keys(USERS[user])
        self.find("#loginBtn").click()
        self.wait(f"{user} logged in (the project menu)",
                  lambda: "/auth/login" not in self.driver.current_url
                  and (bar := self.find(".navbar")) and user in bar.text, 60)

    def fill(self, values: dict[str, str]) -> None:
        """Form fields by name: text typed; a choice picked from Horizon's themable dropdown (its
        <select> is hidden behind it) or from a plain <select>."""
        for name, value in values.items():
            field = self.wait(f"form field {name!r}", lambda n=name: self.field(n), 30)
            if field.tag_name != "select":
                field.clear()
                field.send_keys(value)
            elif field.is_displayed():
                Select(field).select_by_value(value)
            else:
                menu = field.find_element(
                    By.XPATH, "./ancestor::div[contains(@class, 'themable-select')]")
                menu.find_element(By.CSS_SELECTOR, "button.dropdown-toggle").click()
                choice = self.wait(f"choice {value!r} of {name!r}", lambda m=menu, v=value: [
                    a for a in m.find_elements(By.CSS_SELECTOR, f"a[data-select-value='{v}']")
                    if a.is_displayed()], 10)
                choice[0].click()
            if field.get_attribute("value") != value:
                raise self.fail(f"form field {name!r} holds {field.get_attribute('value')!r}, "
                                f"not {value!r}")

    def field(self, name: str) -> WebElement | None:
        """The form's field NAME (in the modal if one is open), shown or behind a widget."""
        for scope in (".modal ", ""):
            found = self.driver.find_elements(By.CSS_SELECTOR, f"{scope}[name={name}]")
            if found:
                return found[0]
        return None

    def submit(self) -> None:
        button = self.wait("the form's submit button", lambda: self.find(
            ".modal-footer [type=submit], form [type=submit].btn-primary"), 30)
        button.click()

    def row(self, table: str, text: str, status: str = "") -> WebElement | None:
        """The first row of TABLE whose text contains TEXT and STATUS (Horizon's rows:
        <table id>__row__<id>)."""
        for tr in self.driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr"):
            if text in tr.text and status in tr.text and tr.get_attribute("id"):
                return tr
        return None

    def row_id(self, table: str, text: str) -> str:
        tr = self.row(table, text)
        if tr is None:
            raise self.fail(f"no row {text!r} in table {table}")
        return tr.get_attribute("data-object-id") or tr.get_attribute("id").split("__row__", 1)[1]

    def row_action(self, table: str, object_id: str, action: str) -> str:
        """The URL of a row's link action, as the row menu offers it."""
        links = self.driver.find_elements(
            By.CSS_SELECTOR, f"#{table}__row_{object_id}__action_{action}")
        if not links:
            raise self.fail(f"the row {object_id} of {table} offers no {action!r} action")
        return links[0].get_attribute("href")

    def load_ms(self, path: str) -> float:
        """One full page load (navigation start to the load event), in milliseconds."""
        self.open(path)
        return float(self.driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0];"
            " return t.loadEventEnd - t.startTime;"))


def row_has(b: Browser, table: str, text: str, status: str, name: str) -> WebElement | None:
    """The row of TABLE with TEXT in STATUS; fails at once if the row named NAME is in error."""
    failed = b.row(table, name, "Error")
    if failed is not None:
        raise b.fail(f"row {name!r} of {table} is in error: {failed.text!r}")
    return b.row(table, text, status)


def flow(b: Browser, package: Path, run: str) -> tuple[dict[str, float], dict[str, str], str]:
    """The member of demo's flow; returns its timings (seconds), the ids of what it made and
    the synthesis page's path."""
    times: dict[str, float] = {}
    b.login("demo")
    b.open("/project/")
    b.shot("01-demo-project-overview")

    # import the package through the modal form: upload with Horizon's progress bar
    b.open("/project/cloudlet_bases/")
    b.wait("the Import Package button", lambda: b.find("#bases__action_import"), 30).click()
    b.wait("the import form (modal)", lambda: b.find(".modal [name=package]"), 60)
    b.find(".modal [name=package]").send_keys(str(package))
    b.fill({"name": f"browser-base-{run}"})
    t0 = time.monotonic()
    b.submit()
    b.wait("the upload's progress bar or the table", lambda: b.find(".modal .progress, #bases"), 60)
    b.shot("02-demo-base-import-progress")
    # the row of the package's base: named browser-base-<run>, or the name it has from an
    # earlier import of the same package on this stack (an import of a base id already in the
    # project publishes nothing new)
    base_id = package_base_id(package)
    b.wait(f"base {base_id[:12]} (browser-base-{run}) Active in Base VMs", lambda: row_has(
        b, "bases", base_id[:12], "Active", f"browser-base-{run}"), 900, reload=True, every=3)
    times["import (upload, verify, publish)"] = time.monotonic() - t0
    b.shot("03-demo-bases")
    base = b.row(table="bases", text=base_id[:12], status="Active").get_attribute("id").split(
        "__row__", 1)[1]

    # launch an instance from it: flavor preselected from the base's memory size
    b.open(b.row_action("bases", base, "launch").removeprefix(b.url))
    flavor = b.wait("the launch form", lambda: b.field("flavor"), 60)
    if not flavor.get_attribute("value"):
        raise b.fail("the launch form preselects no flavor")
    b.fill({"name": f"browser-vm-{run}", "network": "none"})
    b.shot("04-demo-launch-form")
    t0 = time.monotonic()
    b.submit()
    b.wait("the form to leave", lambda: "/launch/" not in b.driver.current_url, 120)
    b.open("/project/instances/")
    b.wait(f"instance browser-vm-{run} Active", lambda: row_has(
        b, "instances", f"browser-vm-{run}", "Active", f"browser-vm-{run}"),
           600, reload=True, every=3)
    times["launch from the base -> Active"] = time.monotonic() - t0
    b.shot("05-demo-instances")
    server = b.row_id("instances", f"browser-vm-{run}")

    # an overlay of the running instance (the Instances row menu's "Create Overlay"), kept
    b.open(b.row_action("instances", server, "create_overlay").removeprefix(b.url))
    b.fill({"name": f"browser-app-{run}", "after": "resume"})
    t0 = time.monotonic()
    b.submit()
    b.wait("the form to leave", lambda: "/create/" not in b.driver.current_url, 120)
    b.open("/project/cloudlet_overlays/")
    b.wait(f"overlay browser-app-{run} Active in Overlays", lambda: row_has(
        b, "overlays", f"browser-app-{run}", "Active", f"browser-app-{run}"),
           900, reload=True, every=3)
    times["create overlay -> Active"] = time.monotonic() - t0
    b.shot("06-demo-overlays")
    overlay = b.row_id("overlays", f"browser-app-{run}")
    b.open(f"/project/cloudlet_overlays/{overlay}/")
    b.shot("07-demo-overlay-detail")

    # synthesize it: the synthesis page, ACTIVE, the timeline with real numbers
    b.open("/project/cloudlet_overlays/")
    b.open(b.row_action("overlays", overlay, "synthesize").removeprefix(b.url))
    b.wait("the synthesize form", lambda: b.field("flavor"), 60)
    b.fill({"name": f"browser-app1-{run}", "flavor": flavor_value(b), "network": "none"})
    t0 = time.monotonic()
    b.submit()
    b.wait("the synthesis page", lambda: "/cloudlet_syntheses/" in b.driver.current_url, 120)
    synthesis_url = b.driver.current_url.removeprefix(b.url)
    b.wait("the synthesized server ACTIVE", lambda: server_status(b) == "ACTIVE", 600,
           reload=True, every=1)
    times["Synthesize -> ACTIVE (in the browser)"] = time.monotonic() - t0
    check_synthesis(b, run)
    page_loads(b, overlay, run)
    return times, {"base": base, "server": server, "overlay": overlay}, synthesis_url


def server_status(b: Browser) -> str | None:
    """The synthesis page's "Server status" (Nova's status of the synthesized server)."""
    for dt in b.driver.find_elements(By.CSS_SELECTOR, ".detail dt"):
        if dt.text.strip() == "Server status":
            return dt.find_element(By.XPATH, "following-sibling::dd[1]").text.split()[0]
    return None


def check_synthesis(b: Browser, run: str) -> None:
    """The synthesis page's timeline: >= 1 stage bar with a numeric duration, shown."""
    bars = b.wait("the timeline chart with >= 1 stage bar", lambda: b.driver.find_elements(
        By.CSS_SELECTOR, "#synthesis-timeline .stage-bar"), 180, reload=True, every=2)
    seconds = [bar.get_attribute("data-seconds") for bar in bars]
    if not any(s and NUMBER.fullmatch(s) for s in seconds):
        raise b.fail(f"no stage bar has a numeric duration: data-seconds {seconds}")
    chart = b.find("#synthesis-timeline")
    if not re.search(r"\d+(\.\d+)? ?s\b", chart.text):
        raise b.fail(f"the timeline shows no duration: {chart.text!r}")
    stages = [bar.get_attribute("data-stage") for bar in bars]
    print(f"browser: timeline: {len(bars)} stage bars: " + ", ".join(
        f"{n} {s} s" for n, s in zip(stages, seconds, strict=True)))
    b.shot("08-demo-synthesis-timeline")
    b.open("/project/cloudlet_syntheses/")
    b.wait(f"browser-app1-{run} in Syntheses", lambda: b.row(
        "syntheses", f"browser-app1-{run}"), 60)
    b.shot("09-demo-syntheses")


def page_loads(b: Browser, overlay: str, run: str) -> None:
    """Median of 10 full page loads of each table (Overlays filled to 20 rows)."""
    copies = fill_overlays(overlay, run, 20)
    print(f"browser: {copies} more overlay images (copies of browser-app-{run}'s file and "
          "properties) for a 20-row Overlays table")
    for name, path in (("Base VMs", "/project/cloudlet_bases/"),
                       ("Overlays", "/project/cloudlet_overlays/"),
                       ("Syntheses", "/project/cloudlet_syntheses/"),
                       ("Instances", "/project/instances/")):
        loads = [b.load_ms(path) for _ in range(10)]
        table = {"Instances": "instances", "Base VMs": "bases", "Overlays": "overlays",
                 "Syntheses": "syntheses"}[name]
        rows = len(b.driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr[id]"))
        print(f"browser: page load {name}: median of 10 {statistics.median(loads):.0f} ms "
              f"(min {min(loads):.0f}, max {max(loads):.0f}) with {rows} rows")



def others_see_nothing(b: Browser, run: str, mine: dict[str, str], synthesis_url: str) -> None:
    """A member of another project sees none of demo's objects, in tables or at their URLs."""
    overlay = mine["overlay"]
    b.login("alt_demo")
    for n, (name, path) in enumerate((("bases", "/project/cloudlet_bases/"),
                                      ("overlays", "/project/cloudlet_overlays/"),
                                      ("syntheses", "/project/cloudlet_syntheses/"),
                                      ("instances", "/project/instances/")), start=10):
        b.open(path)
        b.wait(f"alt_demo's {name} table", lambda t=name: b.find(f"#{t}"), 60)
        b.shot(f"{n}-alt_demo-{name}")
        source = b.driver.page_source
        for what, object_id in mine.items():
            if object_id in source or f"-{run}" in source:
                raise b.fail(f"alt_demo's {name} page shows demo's {what} ({object_id})")
    for what, path in (("overlay", f"/project/cloudlet_overlays/{overlay}/"),
                       ("synthesis", synthesis_url)):
        b.driver.get(b.url + path)
        b.shot(f"14-alt_demo-{what}-detail-url")
        if f"-{run}" in b.driver.page_source:
            raise b.fail(f"alt_demo opened demo's {what} at {path}")


def package_base_id(package: Path) -> str:
    """The base id a .cbase package's manifest names (a zstd-compressed tar)."""
    import json
    import tarfile

    import zstandard

    with package.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as z, \
            tarfile.open(fileobj=z, mode="r|") as tar:
        for member in tar:
            if member.name == "manifest.json":
                return json.loads(tar.extractfile(member).read())["base_id"]
    raise Failure(f"{package} has no manifest.json")


def fill_overlays(overlay: str, run: str, rows: int) -> int:
    """Fill demo's Overlays table to ROWS rows with Glance images holding the same overlay file
    and cloudlet properties as OVERLAY (as a user could upload them): the page-load figure is for
    a 20-row table. Returns how many it made."""
    import openstack  # the all-in-one's venv has it; only this seeding talks to the APIs

    from cloudletclient.sdk import register

    conn = register(openstack.connect(
        auth_url="http://127.0.0.1:5000/v3", username="demo", password=USERS["demo"],
        project_name="demo", user_domain_name="Default", project_domain_name="Default",
        region_name="RegionOne"))
    have = sum(1 for _ in conn.cloudlet.overlays())
    image = conn.image.get_image(overlay)
    properties = {k: v for k, v in image.properties.items() if k.startswith("cloudlet_")}
    with tempfile.NamedTemporaryFile() as f:
        conn.image.download_image(image, output=f.name)
        for i in range(rows - have):
            conn.create_image(f"browser-copy{i:02d}-{run}", filename=f.name, wait=True,
                              disk_format=image.disk_format,
                              container_format=image.container_format,
                              allow_duplicates=True, meta=properties)
    return max(0, rows - have)


def flavor_value(b: Browser) -> str:
    """The value of e2e.sh's flavor in the form's flavor choices."""
    for option in b.driver.find_elements(By.CSS_SELECTOR, "[name=flavor] option"):
        if option.get_attribute("textContent").strip().startswith(FLAVOR):
            return option.get_attribute("value")
    raise b.fail(f"no flavor {FLAVOR} to choose")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="Horizon's address")
    parser.add_argument("--package", type=Path, default=AIO_DIR / "e2e" / "e2e-base.cbase",
                        help="the base package to import (e2e.sh exports it)")
    args = parser.parse_args()
    shots = Path(os.environ.get("CLOUDLET_ARTIFACTS", CHECKOUT / "artifacts" / "browser"))
    if not args.package.is_file():
        print(f"browser: FAILED: no package {args.package}: run tools/aio/e2e.sh first",
              file=sys.stderr)
        return 1
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    t0 = time.monotonic()
    run = time.strftime("%H%M%S")
    try:
        b = Browser(args.url, shots)
        try:
            times, mine, synthesis_url = flow(b, args.package, run)
        finally:
            b.close()
        b = Browser(args.url, shots)  # a new profile: nothing of demo's session left
        try:
            others_see_nothing(b, run, mine, synthesis_url)
        finally:
            b.close()
    except Failure as e:
        print(f"browser: FAILED: {e}", file=sys.stderr)
        return 1
    for what, seconds in times.items():
        print(f"browser: {what}: {seconds:.1f} s")
    print(f"browser: PASSED in {time.monotonic() - t0:.0f} s; screenshots in {shots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
