"""The web dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven
by Selenium), against the whole platform over real HTTP (tests/support/stack.py): sign up,
an organization, a project with its RAM and CPU, a secret (its name shown, its value never),
a deployed command app whose status becomes running and whose log lines appear, a rollback,
its metrics charts, a custom domain, members and roles, billing, the audit log, log out; a
viewer who sees no write or member control and whose forged write the API refuses; a
platform admin who sees the servers; and an XSS probe rendered as text. Screenshots of the
main pages go to docs/screenshots/.

The tests run in file order and share one `Journey`. Waits are explicit DOM conditions with
a generous bound, never sleeps.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.agent.containers import unavailable_reason
from tests.support import stack as stack_fixtures
from tests.support.stack import PASSWORD, Stack, _promote, sign_up

pytestmark = pytest.mark.slow

stack = stack_fixtures.stack

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
WAIT_SECONDS = 30.0
DEPLOY_WAIT_SECONDS = 90.0  # a first start in the container sandbox can take a while
GREETING = "hello-from-the-dashboard"
APP = 'echo "release {release}: greeting is $GREETING"; exec python3 -m http.server "$PORT"'
SHIPPED = "shipped-from-a-folder"
TICKER = (
    'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 1; done & '
    'exec python3 -m http.server "$PORT"'
)
SLOW = 'sleep 60; exec python3 -m http.server "$PORT"'
XSS = "<script>window.__xss=1</script>"
# The gateway ends every stream after this long here (1 h by default), so that the live logs
# reconnect during the test; it bounds uploads too, which take well under a second here.
STREAM_TIMEOUT_SECONDS = 20
XSS_IMG = '<img src=x onerror="window.__xss=2">'

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
        WebDriverException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None  # type: ignore[assignment]


def _missing_browser() -> str:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if absent:
        return (
            f"{' and '.join(absent)} missing: scripts/system-packages.sh installs Debian's "
            "chromium and chromium-driver as root"
        )
    return ""


@dataclass
class Journey:
    stack: Stack
    driver: WebDriver
    http: httpx.Client
    email: str = ""
    org: dict[str, Any] = field(default_factory=dict)
    project: dict[str, Any] = field(default_factory=dict)
    deploy_skip: str = ""
    viewer_email: str = ""
    member_email: str = ""

    # --- the browser, as a user drives it ---------------------------------------------

    def open(self, hash_path: str = "") -> None:
        self.driver.get(f"{self.stack.url}/{hash_path}")

    def until(self, condition: Callable[[], Any], what: str, within: float = WAIT_SECONDS) -> Any:
        def probe(_: Any) -> Any:
            try:
                return condition()
            except (NoSuchElementException, StaleElementReferenceException):
                return None

        wait = WebDriverWait(self.driver, within, poll_frequency=0.2)
        return wait.until(probe, message=f"waiting {within}s for {what}")

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def visible(self, css: str) -> WebElement:
        found: WebElement = self.until(
            lambda: next((e for e in self.all(css) if e.is_displayed()), None), css
        )
        return found

    def fill(self, form: str, values: dict[str, str]) -> None:
        for name, value in values.items():
            box = self.visible(f'form[name="{form}"] [name="{name}"]')
            box.clear()
            box.send_keys(value)

    def submit(self, form: str) -> None:
        button = self.visible(f'form[name="{form}"] button[type="submit"]')
        self.until(button.is_enabled, f"the {form} button enabled")
        button.click()

    def text(self, css: str) -> str:
        return " ".join(e.text for e in self.all(css))

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SCREENSHOTS / name))

    def deployment_rows(self) -> list[tuple[str, str]]:
        """(status, release reason) of each deployment row, newest first."""
        return [
            (
                row.find_element(By.CSS_SELECTOR, ".status").text,
                row.find_element(By.CSS_SELECTOR, ".release-reason").text,
            )
            for row in self.all("#deployments tbody tr")
        ]

    # --- the API, as the tests' own client --------------------------------------------

    def token(self, email: str) -> str:
        reply = self.http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert reply.status_code == 200, reply.text
        token: str = reply.json()["accessToken"]
        return token


@pytest.fixture(scope="module", autouse=True)
def _short_streams() -> Iterator[None]:
    """Set before this module's stack starts (autouse: first in its scope); the services
    inherit os.environ (service_environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HANGAR_GATEWAY_STREAM_TIMEOUT_SECONDS", str(STREAM_TIMEOUT_SECONDS))
        yield


@pytest.fixture(scope="module")
def journey(stack: Stack) -> Iterator[Journey]:
    missing = _missing_browser()
    if missing:
        print(f"\n[dashboard] skipped: {missing}")
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # runs as root in CI containers, where Chromium's sandbox cannot
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--disable-gpu",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.fail(f"chromium did not start: {exc.msg}")
    # The viewport itself 1280x800, whatever the window's decorations take.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        with stack.client() as http:
            yield Journey(stack, driver, http)
    finally:
        driver.quit()
    stack.check_alive()


def _console_errors(j: Journey) -> list[str]:
    """Script errors and CSP violations so far; the API's refusals the tests provoke (a
    wrong password, a bad secret name) are "network" entries, left out."""
    return [
        entry["message"]
        for entry in j.driver.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]


def test_the_login_page_loads_under_its_csp_and_explains_a_bad_password(
    journey: Journey,
) -> None:
    j = journey
    j.open()
    j.until(lambda: j.driver.current_url.endswith("#/login"), "the login page")
    j.visible('form[name="login"] input[name="email"]')
    assert j.driver.title == "Hangar"
    j.screenshot("dashboard-login.png")
    # Every script ran under script-src 'self': a CSP violation is a console error.
    assert _console_errors(j) == []

    j.fill("login", {"email": "nobody@example.com", "password": "not the password"})
    j.submit("login")
    error = j.visible('form[name="login"] .error')
    assert error.get_attribute("role") == "alert"
    assert error.text.endswith(".") and "{" not in error.text, error.text


def test_sign_up_and_create_an_organization(journey: Journey) -> None:
    j = journey
    j.find('a[href="#/signup"]').click()
    j.email = f"dash-{secrets.token_hex(4)}@example.com"
    j.fill("signup", {"name": "Ada", "email": j.email, "password": PASSWORD})
    j.submit("signup")
    # No organization yet: the dashboard asks for one.
    j.visible('form[name="create-org"]')
    assert j.find("#who").text == j.email
    slug = f"dash-{secrets.token_hex(3)}"
    j.fill("create-org", {"name": "Ada Labs", "slug": slug})
    j.submit("create-org")
    j.until(lambda: "Projects" in j.find("h1").text, "the projects page of the new org")
    assert "Ada Labs" in j.find("h1").text
    assert j.find("#my-role").text == "owner"
    orgs = j.http.get("/v1/organizations", headers={"Authorization": f"Bearer {j.token(j.email)}"})
    j.org = next(o for o in orgs.json()["organizations"] if o["slug"] == slug)


def _slide(j: Journey, form: str, values: dict[str, int]) -> None:
    """Move range sliders as a user does: the value, then an input event."""
    for name, value in values.items():
        slider = j.visible(f'form[name="{form}"] input[name="{name}"]')
        j.driver.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
            slider,
            str(value),
        )
        j.until(lambda s=slider, v=value: s.get_attribute("value") == str(v), f"{name} at {value}")


def test_create_a_project_with_its_resources(journey: Journey) -> None:
    j = journey
    j.visible('form[name="create-project"]')  # once the organization's plan exists
    j.fill("create-project", {"name": "Web", "slug": "web"})
    # RAM and CPU are sliders up to what the plan's pool has left.
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}
    sub = j.http.get(f"/v1/organizations/{j.org['id']}/subscription", headers=owner).json()
    free_ram = int(sub["pool"]["ramMb"]) - int(sub.get("allocated", {}).get("ramMb", 0))
    ram = j.find('form[name="create-project"] input[name="ramMb"]')
    assert ram.get_attribute("type") == "range"
    assert int(ram.get_attribute("max") or 0) == free_ram
    _slide(j, "create-project", {"ramMb": 256, "cpuMillis": 250})
    j.submit("create-project")
    link = j.visible("#projects a.project-name")
    assert link.text == "Web"
    assert "256 MB · 250 mCPU" in j.text("#projects tbody tr")
    assert "never deployed" in j.text("#projects tbody tr")
    link.click()
    j.until(lambda: j.find("#project-name").text == "Web", "the project page")
    address = j.find("#project-url a")
    assert (address.get_attribute("href") or "").startswith("http") and "web-" in address.text
    j.project = {"id": j.driver.current_url.rsplit("/", 1)[-1]}


def test_a_secret_shows_its_name_and_never_its_value(journey: Journey) -> None:
    j = journey
    value_box = j.visible('form[name="set-secret"] input[name="value"]')
    assert value_box.get_attribute("type") == "password"
    j.fill("set-secret", {"name": "GREETING", "value": GREETING})
    j.submit("set-secret")
    j.until(lambda: j.find("#secrets .secret-name").text == "GREETING", "the secret's name")
    assert GREETING not in j.driver.page_source
    # A name the API refuses comes back as a readable sentence beside the form.
    j.fill("set-secret", {"name": "lower", "value": "x"})
    j.driver.execute_script(  # past the browser's own pattern check, to reach the API's
        'document.querySelector(\'form[name="set-secret"] input[name="name"]\')'
        ".removeAttribute('pattern')"
    )
    j.submit("set-secret")
    error = j.visible('form[name="set-secret"] .error')
    assert error.text and "{" not in error.text, error.text


def _deploy(j: Journey, release: str) -> None:
    _deploy_command(j, APP.format(release=release))


def _deploy_command(j: Journey, command: str) -> None:
    j.visible('form[name="deploy"] input[value="command"]').click()  # not source or image
    j.fill("deploy", {"command": command})
    j.submit("deploy")


def _latest(j: Journey) -> tuple[str, str]:
    rows = j.deployment_rows()
    return rows[0] if rows else ("", "")


def test_deploy_a_command_see_it_run_and_its_logs(journey: Journey) -> None:
    j = journey
    reason = unavailable_reason()
    if reason:
        j.deploy_skip = f"the container sandbox is missing: {reason}"
        print(f"\n[dashboard] deploy steps skipped: {j.deploy_skip}")
        pytest.skip(j.deploy_skip)
    _deploy(j, "A")
    j.until(lambda: _latest(j) == ("running", "deploy"), "release A running", DEPLOY_WAIT_SECONDS)
    line = f"release A: greeting is {GREETING}"
    j.until(lambda: line in j.text("#logs .line"), "release A's log line", DEPLOY_WAIT_SECONDS)
    # A second release, so that there is one to roll back to.
    _deploy(j, "B")
    j.until(
        lambda: _latest(j) == ("running", "deploy") and len(j.deployment_rows()) == 2,
        "release B running",
        DEPLOY_WAIT_SECONDS,
    )
    j.until(lambda: "release B: greeting" in j.text("#logs .line"), "release B's log line")


def test_roll_back_in_one_click(journey: Journey) -> None:
    j = journey
    if j.deploy_skip:
        pytest.skip(j.deploy_skip)
    rollback = j.visible("#deployments tbody tr:first-child button.rollback")
    rollback.click()
    j.until(
        lambda: _latest(j) == ("running", "rollback"),
        "the rollback running",
        DEPLOY_WAIT_SECONDS,
    )
    # The rollback runs release A's command again.
    j.until(lambda: j.text("#logs .line").count("release A: greeting") >= 2, "A's line again")
    j.driver.execute_script("document.getElementById('project-name').scrollIntoView()")
    j.screenshot("dashboard-project.png")
    j.open("#/projects")
    j.until(lambda: "running" in j.text("#projects .status"), "running at a glance")
    j.screenshot("dashboard-projects.png")


def test_deploy_two_replicas_and_see_each_run(journey: Journey) -> None:
    j = journey
    if j.deploy_skip:
        pytest.skip(j.deploy_skip)
    j.open(f"#/projects/{j.project['id']}")
    j.visible('form[name="deploy"] input[value="command"]').click()
    j.fill("deploy", {"command": APP.format(release="C"), "replicas": "2"})
    j.submit("deploy")

    def both_running() -> bool:
        rows = j.all("#deployments tbody tr")[:2]
        notes = sorted(
            r.find_element(By.CSS_SELECTOR, ".replica").text
            for r in rows
            if r.find_elements(By.CSS_SELECTOR, ".replica")
        )
        return notes == ["replica 1 of 2", "replica 2 of 2"] and [
            s for s, _ in j.deployment_rows()[:2]
        ] == ["running", "running"]

    j.until(both_running, "both replicas of release C running", DEPLOY_WAIT_SECONDS)
    j.until(lambda: "release C: greeting" in j.text("#logs .line"), "release C's log line")
    j.driver.execute_script("document.getElementById('deployments').scrollIntoView()")
    j.screenshot("dashboard-replicas.png")
    j.fill("deploy", {"replicas": "1"})  # the next tests' deploys run one


def _chart_points(j: Journey, metric: str) -> int:
    return int(j.find(f'#metrics .chart[data-metric="{metric}"]').get_attribute("data-points") or 0)


def test_metrics_charts_render_under_the_csp(journey: Journey) -> None:
    j = journey
    j.open(f"#/projects/{j.project['id']}")
    j.until(lambda: len(j.all("#metrics .chart canvas")) == 3, "three metrics charts")
    metrics = [c.get_attribute("data-metric") for c in j.all("#metrics .chart")]
    assert metrics == ["cpu", "memory", "bandwidth"]
    if not j.deploy_skip:
        # The running app's samples reach the chart (the agent samples every second here).
        j.until(lambda: _chart_points(j, "memory") > 0, "memory samples", DEPLOY_WAIT_SECONDS)
    j.find('#metrics button[data-range="24h"]').click()
    j.until(
        lambda: (
            j.find('#metrics button[data-range="24h"]').get_attribute("aria-pressed") == "true"
            and len(j.all("#metrics .chart canvas")) == 3
        ),
        "the 24h charts",
    )
    j.find('#metrics button[data-range="1h"]').click()
    j.until(lambda: len(j.all("#metrics .chart canvas")) == 3, "the 1h charts again")
    # uPlot styles its elements through the CSSOM, which style-src 'self' allows: no
    # violation (a console error) is logged.
    assert _console_errors(j) == []
    if not j.deploy_skip:
        try:  # a few points make a line in the screenshot; fewer is not a failure
            j.until(lambda: _chart_points(j, "memory") >= 4, "a few memory points", 60)
        except TimeoutException:
            print("\n[dashboard] the metrics screenshot has fewer than 4 points")
    j.driver.execute_script("document.getElementById('metrics').scrollIntoView()")
    j.screenshot("dashboard-metrics.png")


def test_a_custom_domain_is_added_pending_with_its_verification_path(journey: Journey) -> None:
    j = journey
    j.open(f"#/projects/{j.project['id']}")
    hostname = f"www.dash-{secrets.token_hex(3)}.example.com"
    j.fill("add-domain", {"hostname": hostname})
    j.submit("add-domain")
    row = f'#domains li[data-hostname="{hostname}"]'
    j.until(lambda: j.find(f"{row} .domain-status").text == "pending", "the domain pending")
    url = j.find(f"{row} .verification-url").text
    assert url.startswith(f"http://{hostname}/.well-known/hangar-domain/"), url
    assert j.find(f"{row} .verification-token").text
    # Verify: either the check passes (the test stack's edge answers it) or the API's
    # sentence says why not.
    j.find(f"{row} button.verify-domain").click()
    j.until(
        lambda: j.find(f"{row} .domain-status").text == "verified" or j.all(f"{row} .error"),
        "the verification's outcome",
    )
    for error in j.all(f"{row} .error"):
        assert error.text.endswith(".") and "{" not in error.text, error.text
    j.find(f"{row} button.remove-domain").click()
    j.until(lambda: j.all("#no-domains"), "the domain removed")


def _member_row(j: Journey, email: str) -> str:
    return f'#members tr[data-email="{email}"]'


def test_an_owner_adds_a_member_and_changes_their_role(journey: Journey) -> None:
    j = journey
    j.member_email = sign_up(j.http, "member").email
    j.open("#/projects")
    j.visible("#nav-members").click()
    j.until(lambda: j.find("#my-role").text == "owner", "the members page")
    assert j.all("#nav-servers") == []  # not a platform admin
    j.fill("add-member", {"email": j.member_email})
    j.submit("add-member")  # the role select defaults to viewer
    row = _member_row(j, j.member_email)
    j.until(lambda: j.find(f"{row} .member-role").text == "viewer", "the member as a viewer")

    select = j.find(f'{row} form[name="member-role"] select[name="role"]')
    j.driver.execute_script(  # pick "developer" as a user does, with a change event
        "arguments[0].value = 'ROLE_DEVELOPER';"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}))",
        select,
    )
    j.find(f'{row} form[name="member-role"] button[type="submit"]').click()
    j.until(lambda: j.find(f"{row} .member-role").text == "developer", "the member a developer")

    # Removing the only owner is refused by the API: its reason shown as a sentence.
    me = _member_row(j, j.email)
    j.find(f"{me} button.remove-member").click()
    error = j.visible(f"{me} .error")
    assert "at least one owner" in error.text and error.text.endswith("."), error.text
    assert j.find(f"{me} .member-role").text == "owner"
    j.screenshot("dashboard-members.png")


def test_the_billing_page_shows_the_plan_and_the_pool(journey: Journey) -> None:
    j = journey
    j.visible("#nav-billing").click()
    j.until(lambda: j.find("#plan-name").text, "the plan")
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}
    plan_id = j.http.get(f"/v1/organizations/{j.org['id']}/subscription", headers=owner).json()[
        "planId"
    ]
    plan = j.http.get(f"/v1/plans/{plan_id}", headers=owner).json()
    assert j.find("#plan-name").text.startswith(plan["name"])
    assert j.find("#subscription-status").text == "active"
    ram = j.find('#pool tr[data-resource="RAM"]').text
    assert "256 MB" in ram, ram  # the Web project's allocation
    j.until(lambda: j.all("#invoices") or j.all("#no-invoices"), "the invoices")
    j.until(lambda: j.all("#usage"), "the usage of this period")

    # An owner changes the plan: the page shows the new one.
    plans = j.http.get("/v1/plans", headers=owner).json()["plans"]
    bigger = next(p for p in plans if p["id"] != plan_id and int(p["priceCents"]) > 0)
    select = j.visible('form[name="change-plan"] select[name="planId"]')
    assert select.get_attribute("value") == plan_id
    j.driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}))",
        select,
        bigger["id"],
    )
    j.submit("change-plan")
    j.until(lambda: j.find("#plan-name").text.startswith(bigger["name"]), "the new plan")
    j.driver.execute_script("window.scrollTo(0, 0)")
    j.screenshot("dashboard-billing.png")


def test_the_audit_log_lists_the_member_change(journey: Journey) -> None:
    j = journey
    j.visible("#nav-audit").click()
    j.until(lambda: j.all("#audit tbody tr"), "audit entries")
    j.fill("audit-filter", {"action": "member.role_changed"})
    j.find('form[name="audit-filter"] button[type="submit"]').click()

    def only_role_changes() -> bool:
        actions = [e.text for e in j.all("#audit .audit-action")]
        return bool(actions) and set(actions) == {"member.role_changed"}

    j.until(only_role_changes, "the role change, filtered")
    assert j.email in j.text("#audit .audit-actor")
    assert j.member_email in j.text("#audit tbody tr")
    j.find("#verify-chain").click()
    j.until(lambda: j.find("#chain-result").text.startswith("Intact"), "the chain verified")


def test_deploy_a_folder_packed_in_the_browser(journey: Journey, tmp_path: Path) -> None:
    j = journey
    folder = tmp_path / "my-app"
    (folder / "static" / ("a-rather-long-folder-name-" * 4)).mkdir(parents=True)
    (folder / "Procfile").write_text(f'web: echo "{SHIPPED}"; exec python3 -m http.server $PORT\n')
    (folder / "static" / "index.html").write_text("<p>shipped</p>\n")
    (folder / "static" / ("a-rather-long-folder-name-" * 4) / "deep.txt").write_text("deep\n")
    j.open(f"#/projects/{j.project['id']}")
    j.visible('form[name="deploy"] input[value="source"]').click()
    j.visible('form[name="deploy"] input[name="folder"]').send_keys(str(folder))
    j.submit("deploy")
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}

    def uploaded() -> str:
        reply = j.http.get(f"/v1/projects/{j.project['id']}/sources", headers=owner)
        sources = reply.json().get("sources", [])
        return str(sources[0]["sha256"]) if sources else ""

    # The API accepted the archive (it refuses anything that is not a complete gzip'd tar).
    sha = j.until(uploaded, "the folder uploaded as a source")
    if j.deploy_skip:
        error = j.visible('form[name="deploy"] .error')
        assert error.text.endswith(".") and "{" not in error.text, error.text
        return
    j.until(lambda: f"source {sha[:12]}" in j.text("#deployments td.mono"), "the source deploying")
    j.until(
        lambda: (
            _latest(j)[0] == "running"
            and f"source {sha[:12]}" in j.text("#deployments tbody tr:first-child")
        ),
        "the folder's release running",
        DEPLOY_WAIT_SECONDS,
    )
    j.until(lambda: SHIPPED in j.text("#logs .line"), "the folder's release's log line")


def _ticks(j: Journey) -> list[int]:
    """The tick numbers on screen, in order."""
    lines = j.driver.execute_script(
        "return [...document.querySelectorAll('#logs .line')].map(e => e.textContent)"
    )
    return [int(line.split()[1]) for line in lines if line.startswith("tick ")]


def _type_filter(j: Journey, text: str) -> None:
    j.driver.execute_script(  # as typing does: the value, then an input event
        "const box = document.getElementById('log-filter'); box.value = arguments[0];"
        "box.dispatchEvent(new Event('input', {bubbles: true}))",
        text,
    )


def test_live_logs_stream_filter_and_pause(journey: Journey) -> None:
    j = journey
    if j.deploy_skip:
        pytest.skip(j.deploy_skip)
    j.open(f"#/projects/{j.project['id']}")
    j.until(lambda: j.find("#live-logs").get_attribute("data-state") == "live", "the log stream")
    j.driver.execute_script("window.__noReload = 1")
    _deploy_command(j, TICKER)
    # Lines the app prints arrive through the open stream: no reload, no polling.
    j.until(lambda: len(_ticks(j)) >= 2, "the first ticks, live", DEPLOY_WAIT_SECONDS)
    seen = max(_ticks(j))
    j.until(lambda: max(_ticks(j)) >= seen + 2, "later ticks, live")
    assert j.driver.execute_script("return window.__noReload") == 1
    ticks = _ticks(j)
    assert ticks == sorted(ticks) and len(ticks) == len(set(ticks)), ticks  # no repeats
    assert "stdout" in j.text("#logs .log-stdout .stream")
    j.until(lambda: _latest(j) == ("running", "deploy"), "the ticker running", DEPLOY_WAIT_SECONDS)

    # The filter hides the lines without its text (case-insensitive), and gives them back.
    _type_filter(j, "GREETING IS")
    j.until(lambda: _ticks(j) == [] and j.all("#logs .line"), "only the greeting lines")
    assert all("greeting is" in e.text for e in j.all("#logs .line"))
    _type_filter(j, "")
    j.until(lambda: len(_ticks(j)) >= 2, "every line again")

    # Pause holds new lines back; resume shows them.
    j.find("#log-pause").click()
    j.until(lambda: j.find("#log-pause").get_attribute("aria-pressed") == "true", "paused")
    frozen = _ticks(j)
    j.until(lambda: int(j.find("#log-held").text.split()[0]) >= 2, "new lines held while paused")
    assert _ticks(j) == frozen
    j.driver.execute_script("document.getElementById('logs-title').scrollIntoView()")
    j.screenshot("dashboard-project.png")
    j.find("#log-pause").click()
    j.until(lambda: max(_ticks(j)) > max(frozen) + 1, "the held lines shown on resume")
    ticks = _ticks(j)
    assert ticks == sorted(ticks) and len(ticks) == len(set(ticks)), ticks

    # The gateway ended the stream (every STREAM_TIMEOUT_SECONDS here): the page reconnected
    # and resumed from the last lines without repeating or losing one.
    def connections() -> int:
        return int(j.find("#live-logs").get_attribute("data-connections") or 0)

    j.until(lambda: connections() >= 3, "two reconnects", 3 * STREAM_TIMEOUT_SECONDS + 30)
    after = max(_ticks(j))
    j.until(lambda: max(_ticks(j)) >= after + 2, "ticks after the reconnects")
    ticks = _ticks(j)
    assert ticks == list(range(1, ticks[-1] + 1)), ticks  # every tick once, in order
    assert j.all("#live-logs .error") == []

    # Scrolled up, the view stays put as lines arrive; Follow takes it back to the newest.
    def from_bottom() -> int:
        return int(
            j.driver.execute_script(
                "const b = document.getElementById('logs');"
                "return b.scrollHeight - b.scrollTop - b.clientHeight"
            )
        )

    j.driver.execute_script("document.getElementById('logs').scrollTop = 0")
    j.visible("#log-follow")
    latest = max(_ticks(j))
    j.until(lambda: max(_ticks(j)) >= latest + 2, "more ticks while scrolled up")
    assert j.driver.execute_script("return document.getElementById('logs').scrollTop") == 0
    j.find("#log-follow").click()
    j.until(lambda: j.all("#log-follow") == [], "following again")
    latest = max(_ticks(j))
    j.until(lambda: max(_ticks(j)) >= latest + 1 and from_bottom() < 24, "at the newest line")
    assert _console_errors(j) == []


def test_cancel_a_slow_deployment(journey: Journey) -> None:
    j = journey
    if j.deploy_skip:
        pytest.skip(j.deploy_skip)
    _deploy_command(j, SLOW)
    j.until(lambda: "sleep 60" in j.text("#deployments tbody tr:first-child"), "the slow one")
    cancel = j.visible("#deployments tbody tr:first-child button.cancel-deployment")
    cancel.click()
    j.until(lambda: _latest(j)[0] == "cancelled", "the deployment cancelled", DEPLOY_WAIT_SECONDS)
    assert j.all("#deployments tbody tr:first-child button.cancel-deployment") == []
    assert j.all("#deployments tbody tr:first-child .error") == []


def test_an_admin_reveals_a_secret_after_confirming(journey: Journey) -> None:
    j = journey
    j.open(f"#/projects/{j.project['id']}")
    row = '#secrets li[data-secret="GREETING"]'
    j.visible(f"{row} button.reveal-secret").click()
    j.visible(f"{row} .reveal-confirm")
    assert GREETING not in j.text("#secrets") and j.all(".secret-value") == []
    j.find(f"{row} button.cancel-reveal").click()
    j.visible(f"{row} button.reveal-secret").click()
    j.visible(f"{row} button.confirm-reveal").click()
    j.until(lambda: j.find(f"{row} .secret-value").text == GREETING, "the value revealed")
    j.find(f"{row} button.hide-secret").click()
    j.until(lambda: j.all(".secret-value") == [], "the value hidden")
    assert GREETING not in j.text("#secrets")
    # Revealed, then the page left: the value is gone when coming back.
    j.visible(f"{row} button.reveal-secret").click()
    j.visible(f"{row} button.confirm-reveal").click()
    j.until(lambda: j.all(".secret-value"), "revealed again")
    j.open("#/projects")
    j.visible("#projects a.project-name")
    assert GREETING not in j.driver.page_source
    j.open(f"#/projects/{j.project['id']}")
    j.visible(f"{row} button.reveal-secret")
    assert j.all(".secret-value") == [] and GREETING not in j.text("#secrets")


def test_settings_sliders_are_bounded_by_the_pool(journey: Journey) -> None:
    j = journey
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}
    j.visible('form[name="project-settings"] input[name="ramMb"]')
    sub = j.http.get(f"/v1/organizations/{j.org['id']}/subscription", headers=owner).json()
    project = j.http.get(f"/v1/projects/{j.project['id']}", headers=owner).json()
    own_ram, own_cpu = int(project["resources"]["ramMb"]), int(project["resources"]["cpuMillis"])
    free_ram = int(sub["pool"]["ramMb"]) - int(sub.get("allocated", {}).get("ramMb", 0))
    free_cpu = int(sub["pool"]["cpuMillis"]) - int(sub.get("allocated", {}).get("cpuMillis", 0))
    ram = j.find('form[name="project-settings"] input[name="ramMb"]')
    cpu = j.find('form[name="project-settings"] input[name="cpuMillis"]')
    assert ram.get_attribute("type") == "range"
    assert int(ram.get_attribute("max") or 0) == free_ram + own_ram
    assert int(cpu.get_attribute("max") or 0) == free_cpu + own_cpu
    assert int(ram.get_attribute("value") or 0) == own_ram


def test_settings_change_the_health_check_path_and_sleep(journey: Journey) -> None:
    j = journey
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}
    form = 'form[name="project-settings"]'
    # A path the API refuses: its sentence next to that field.
    j.fill("project-settings", {"healthCheckPath": "healthz"})
    j.submit("project-settings")
    error = j.visible(f'{form} .field-error[data-field="healthCheckPath"]')
    assert "absolute path" in error.text and error.text.endswith("."), error.text
    j.fill("project-settings", {"healthCheckPath": "/healthz"})
    sleep = j.find(f'{form} input[name="sleepEnabled"]')
    if not sleep.is_selected():
        sleep.click()
    j.until(lambda: j.find(f'{form} input[name="sleepAfterSeconds"]').is_enabled(), "after-seconds")
    j.fill("project-settings", {"sleepAfterSeconds": "600"})
    j.submit("project-settings")

    def saved() -> dict[str, Any] | None:
        reply = j.http.get(f"/v1/projects/{j.project['id']}", headers=owner).json()
        return reply if reply.get("healthCheckPath") == "/healthz" else None

    project = j.until(saved, "the settings saved through the API")
    assert project["sleepEnabled"] is True and int(project["sleepAfterSeconds"]) == 600
    j.until(lambda: j.all("#settings-saved"), "the form saying it saved")
    path_box = f'{form} input[name="healthCheckPath"]'
    j.until(lambda: j.find(path_box).get_attribute("value") == "/healthz", "the saved path")
    assert j.all(f"{form} .field-error") == []
    j.driver.execute_script("arguments[0].scrollIntoView()", j.find(form))
    j.screenshot("dashboard-settings.png")


def test_user_strings_render_as_text_never_as_html(journey: Journey) -> None:
    j = journey
    j.open("#/projects")
    j.fill("create-project", {"name": XSS, "slug": "probe", "description": XSS_IMG})
    _slide(j, "create-project", {"ramMb": 64, "cpuMillis": 50})
    j.submit("create-project")
    j.until(lambda: XSS in j.text("#projects a.project-name"), "the probe's name as text")
    j.until(lambda: j.find("#projects tbody tr[data-project-id] a[href*='#/projects/']"), "links")
    probe = next(a for a in j.all("#projects a.project-name") if a.text == XSS)
    probe.click()
    j.until(lambda: j.find("#project-name").text == XSS, "the probe's page")
    assert j.find(".description").text == XSS_IMG
    assert j.all("main script") == [] and j.all("main img") == []
    j.open("#/projects")
    j.until(lambda: XSS in j.text("#projects a.project-name"), "the list again")
    assert j.driver.execute_script("return window.__xss") is None


def test_a_project_is_deleted_only_after_typing_its_slug(journey: Journey) -> None:
    j = journey
    j.open("#/projects")
    probe = j.until(
        lambda: next((a for a in j.all("#projects a.project-name") if a.text == XSS), None),
        "the probe project",
    )
    probe.click()
    delete = j.visible('form[name="delete-project"] button[type="submit"]')
    assert not delete.is_enabled()
    j.fill("delete-project", {"confirm": "prob"})
    assert not delete.is_enabled()
    j.find('form[name="delete-project"] input[name="confirm"]').send_keys("e")
    j.until(delete.is_enabled, "the delete button enabled by the slug")
    delete.click()
    j.until(lambda: j.driver.current_url.endswith("#/projects"), "back to the list")
    j.until(lambda: XSS not in j.text("#projects a.project-name"), "the probe gone")


def _stored_by_scripts(j: Journey) -> list[str]:
    """Every key and value of sessionStorage and localStorage, and document.cookie."""
    found: list[str] = j.driver.execute_script(
        "const all = [document.cookie];"
        "for (const store of [sessionStorage, localStorage]) {"
        "  for (let i = 0; i < store.length; i++) {"
        "    all.push(store.key(i), store.getItem(store.key(i)));"
        "  }"
        "}"
        "return all;"
    )
    return found


def session_cookies(j: Journey) -> list[dict[str, Any]]:
    """The browser's hangar_refresh cookies, HttpOnly or not, whatever the page's path
    (WebDriver's get_cookies shows only those sent to the current page: Path=/v1/auth is not)."""
    every: list[dict[str, Any]] = j.driver.execute_cdp_cmd("Network.getAllCookies", {})["cookies"]
    return [c for c in every if c["name"] == "hangar_refresh"]


def test_the_session_survives_a_reload_out_of_scripts_reach(journey: Journey) -> None:
    j = journey
    j.open("#/projects")
    who = j.until(lambda: j.find("#who").text, "signed in")
    [cookie] = session_cookies(j)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/v1/auth"
    assert not cookie["secure"]  # plain http here
    for item in _stored_by_scripts(j):
        assert "hangar_refresh" not in item and cookie["value"] not in item, item
        assert "token" not in item.lower() and not item.startswith("eyJ"), item  # no JWT
    j.driver.refresh()
    j.until(lambda: j.find("#who").text == who, "still signed in after a reload")
    # A second tab resumes the same session from the cookie; both go on working.
    first = j.driver.current_window_handle
    j.driver.switch_to.new_window("tab")
    try:
        j.open("#/projects")
        j.until(lambda: j.find("#who").text == who, "signed in in a second tab")
    finally:
        j.driver.close()
        j.driver.switch_to.window(first)
    j.driver.refresh()
    j.until(lambda: j.find("#who").text == who, "the first tab still signed in")
    assert _console_errors(j) == []


def test_log_out_ends_the_session(journey: Journey) -> None:
    j = journey
    j.find("#logout").click()
    j.visible('form[name="login"]')
    for item in _stored_by_scripts(j):
        assert "refresh" not in item.lower() and "token" not in item.lower(), item
    assert session_cookies(j) == []
    j.driver.refresh()
    j.visible('form[name="login"]')  # nothing left to resume the session with


def test_a_viewer_sees_no_write_controls_and_the_api_refuses_a_forged_write(
    journey: Journey,
) -> None:
    j = journey
    viewer = sign_up(j.http, "viewer")
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}
    added = j.http.post(
        f"/v1/organizations/{j.org['id']}/members",
        headers=owner,
        json={"email": viewer.email, "role": "ROLE_VIEWER"},
    )
    assert added.status_code == 200, added.text

    j.open("#/login")
    j.fill("login", {"email": viewer.email, "password": PASSWORD})
    j.find('form[name="login"] input[name="password"]').send_keys(Keys.ENTER)  # keyboard
    j.until(lambda: j.find("#my-role").text == "viewer", "the viewer's projects page")
    j.visible("#projects a.project-name")
    assert j.all('form[name="create-project"]') == []
    j.visible("#projects a.project-name").click()
    j.until(lambda: j.find("#project-name").text == "Web", "the project page")
    j.until(lambda: j.all("#deployments") or j.all("#no-deployments"), "the deployments")
    j.until(lambda: j.all("#secrets") or j.all("#no-secrets"), "the secrets")
    for form in ("deploy", "set-secret", "delete-project", "project-settings"):
        assert j.all(f'form[name="{form}"]') == [], form
    assert j.all("button.rollback") == [] and j.all("#secrets button") == []
    assert j.all("button.reveal-secret") == [] and j.all("button.cancel-deployment") == []
    j.visible("#live-logs")  # a viewer reads the logs
    revealed = j.http.get(
        f"/v1/projects/{j.project['id']}/secrets/GREETING:reveal",
        headers={"Authorization": f"Bearer {j.token(viewer.email)}"},
    )
    assert revealed.status_code == 403, revealed.text
    assert j.all('form[name="add-domain"]') == [] and j.all("#domains button") == []
    assert j.all("#nav-audit") == [] and j.all("#nav-servers") == []
    j.find("#nav-members").click()
    j.until(lambda: j.find("#my-role").text == "viewer", "the viewer's members page")
    j.visible(_member_row(j, j.email))
    assert j.all('form[name="add-member"]') == [] and j.all(".member-controls") == []

    forged = j.http.post(
        f"/v1/projects/{j.project['id']}/deployments",
        headers={"Authorization": f"Bearer {j.token(viewer.email)}"},
        json={"command": "exec sleep 100"},
    )
    assert forged.status_code == 403, forged.text
    forged = j.http.put(
        f"/v1/projects/{j.project['id']}/secrets/GREETING",
        headers={"Authorization": f"Bearer {j.token(viewer.email)}"},
        json={"value": "forged"},
    )
    assert forged.status_code == 403, forged.text
    assert _console_errors(j) == []


def test_the_pages_fit_a_phone_screen(journey: Journey) -> None:
    j = journey
    metrics = {"width": 375, "height": 740, "deviceScaleFactor": 1, "mobile": True}
    j.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        pages = (
            ("#/projects", "#projects"),
            (f"#/projects/{j.project['id']}", "#metrics .chart canvas"),
            ("#/members", "#members"),
            ("#/billing", "#pool"),
        )
        for page, ready in pages:
            j.open(page)
            j.visible(ready)
            overflow = j.driver.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{page} scrolls sideways by {overflow}px on a phone"
    finally:
        j.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )


def test_only_a_platform_admin_sees_the_servers(journey: Journey) -> None:
    j = journey
    j.open("#/projects")
    j.visible("#logout").click()
    admin = sign_up(j.http, "platform-admin")
    _promote(j.stack, admin.email)
    j.visible('form[name="login"]')
    j.fill("login", {"email": admin.email, "password": PASSWORD})
    j.submit("login")
    j.visible("#nav-servers").click()
    if j.stack.server_id:
        j.until(lambda: j.all(f'#servers tr[data-server-id="{j.stack.server_id}"]'), "the agent")
    else:
        j.until(lambda: j.all("#servers") or "No servers" in j.text("main"), "the servers")
    # The API agrees with the menu: the same list is refused to a non-admin.
    refused = j.http.get("/v1/servers", headers={"Authorization": f"Bearer {j.token(j.email)}"})
    assert refused.status_code == 403, refused.text
    assert _console_errors(j) == []
