"""The dashboard's accessibility in a real headless Chromium, against the whole platform:
axe-core (tests/data/axe/, injected by the test, never served) finds no serious or critical
WCAG 2 A/AA violation on any main page; a user signs up and creates a project with the
keyboard only, every focused control showing a visible focus indicator; and the
organization's settings: rename (the switcher shows the new name), delete from a modal
dialog that holds and gives back focus (an empty organization, back to the list), no
control for a viewer and the API refusing the viewer's forged rename and delete.

Reuses test_dashboard's browser fixture and helpers (one Chromium, one stack for this
module). Waits are explicit conditions with generous bounds, never sleeps.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from services.agent.containers import unavailable_reason
from tests.e2e import test_dashboard as dashboard
from tests.support import stack as stack_fixtures
from tests.support.stack import PASSWORD, _promote, sign_up, wait_for

pytestmark = pytest.mark.slow

stack = stack_fixtures.stack
journey = dashboard.journey
Journey = dashboard.Journey

AXE = Path(__file__).resolve().parents[1] / "data" / "axe" / "axe.min.js"
# WCAG 2.0 and 2.1, levels A and AA (axe's tags), and axe's best practices (landmarks,
# heading order, ...), which are reported too and held to the same bar.
RULE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
BLOCKING = {"serious", "critical"}
MAX_TABS = 60  # a page's tab stops, with room to spare

try:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
except ImportError:  # pragma: no cover - the dev extra installs it; the fixture skips
    pass


# --- axe ------------------------------------------------------------------------------


def _axe(j: Journey, what: str) -> list[dict[str, Any]]:
    """axe's WCAG 2 A/AA violations on the page as it stands (axe injected once per load)."""
    if not j.driver.execute_script("return typeof window.axe === 'object'"):
        j.driver.execute_script(AXE.read_text(encoding="utf-8"))
    j.driver.set_script_timeout(120)
    result = j.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: arguments[0]},"
        " resultTypes: ['violations']})"
        ".then(r => done(JSON.stringify(r.violations)),"
        " e => done(JSON.stringify({error: String(e)})));",
        RULE_TAGS,
    )
    found = json.loads(result)
    assert isinstance(found, list), f"axe failed on {what}: {found}"
    return found


def _report(violations: list[dict[str, Any]]) -> str:
    lines = []
    for v in violations:
        for node in v["nodes"]:
            lines.append(f"  [{v['impact']}] {v['id']}: {v['help']} -> {node['target']}")
    return "\n".join(lines)


class Audit:
    """axe on each page in turn; every page's serious or critical violations reported at once."""

    def __init__(self, j: Journey) -> None:
        self.j = j
        self.blocking: list[str] = []

    def page(self, what: str) -> None:
        violations = _axe(self.j, what)
        if violations:
            print(f"\n[a11y] {what}:\n{_report(violations)}")
        blocking = [v for v in violations if v["impact"] in BLOCKING]
        if blocking:
            self.blocking.append(f"{what}:\n{_report(blocking)}")

    def check(self) -> None:
        assert not self.blocking, "axe, serious or critical:\n" + "\n".join(self.blocking)


# --- the keyboard ---------------------------------------------------------------------


def _press(j: Journey, *keys: str) -> None:
    ActionChains(j.driver).send_keys(*keys).perform()


FOCUSED = """
const el = document.activeElement;
if (!el || el === document.body) return null;
const s = getComputedStyle(el);
return {
  tag: el.tagName.toLowerCase(), type: el.getAttribute('type') || '',
  name: el.getAttribute('name') || '', id: el.id || '',
  form: el.form ? el.form.getAttribute('name') : '',
  text: (el.textContent || '').trim().slice(0, 40),
  inDialog: Boolean(el.closest('dialog[open]')),
  ring: (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== 'none',
};
"""


def _focused(j: Journey) -> dict[str, Any] | None:
    found: dict[str, Any] | None = j.driver.execute_script(FOCUSED)
    return found


def _tab_to(j: Journey, wanted: dict[str, str], back: bool = False) -> dict[str, Any]:
    """Tab (Shift+Tab if `back`) until the focused element matches `wanted`; every stop on
    the way must show a focus indicator."""
    key = Keys.SHIFT + Keys.TAB if back else Keys.TAB
    seen = []
    for _ in range(MAX_TABS):
        _press(j, key)
        focused = _focused(j)
        if focused is None:
            continue
        seen.append(focused)
        assert focused["ring"], f"no visible focus on {focused}"
        if all(focused.get(k) == v for k, v in wanted.items()):
            return focused
    raise AssertionError(f"Tab never reached {wanted}; stops: {seen}")


def _type(j: Journey, text: str) -> None:
    _press(j, text)


def test_the_signed_out_pages_pass_axe(journey: Journey) -> None:
    j = journey
    audit = Audit(j)
    j.open()
    j.visible('form[name="login"] input[name="email"]')
    audit.page("the log-in page")
    # An error shown: the alert is part of the audit too.
    j.fill("login", {"email": "nobody@example.com", "password": "not the password"})
    j.submit("login")
    j.visible('form[name="login"] .error')
    audit.page("the log-in page with an error")
    j.open("#/signup")
    j.visible('form[name="signup"] input[name="email"]')
    audit.page("the sign-up page")
    audit.check()


def test_sign_up_and_create_a_project_with_the_keyboard_only(journey: Journey) -> None:
    j = journey
    j.open("#/login")
    j.visible('form[name="login"]')
    j.driver.execute_script("document.activeElement && document.activeElement.blur()")
    # Log-in page -> the sign-up link.
    _tab_to(j, {"tag": "a", "text": "Sign up"})
    _press(j, Keys.ENTER)
    j.visible('form[name="signup"]')
    j.email = f"keys-{secrets.token_hex(4)}@example.com"
    _tab_to(j, {"form": "signup", "name": "name"})
    _type(j, "Keys")
    _tab_to(j, {"form": "signup", "name": "email"})
    _type(j, j.email)
    _tab_to(j, {"form": "signup", "name": "password"})
    _type(j, PASSWORD + Keys.ENTER)

    # No organization yet: the create form, then the projects page.
    j.visible('form[name="create-org"]')
    slug = f"keys-{secrets.token_hex(3)}"
    _tab_to(j, {"form": "create-org", "name": "name"})
    _type(j, slug)  # the slug follows the name
    j.until(
        lambda: j.find('form[name="create-org"] input[name="slug"]').get_attribute("value") == slug,
        "the slug following the name",
    )
    _press(j, Keys.ENTER)
    j.until(lambda: "Projects" in j.find("h1").text, "the projects page")
    owner = {"Authorization": f"Bearer {j.token(j.email)}"}
    orgs = j.http.get("/v1/organizations", headers=owner).json()["organizations"]
    j.org = next(o for o in orgs if o["slug"] == slug)

    j.visible('form[name="create-project"]')  # once the plan exists
    j.driver.execute_script("document.activeElement && document.activeElement.blur()")
    _tab_to(j, {"form": "create-project", "name": "name"})
    _type(j, "Web")
    # The sliders: Home to the minimum, then arrow keys, the value shown beside each.
    _tab_to(j, {"form": "create-project", "name": "ramMb", "type": "range"})
    _press(j, Keys.HOME, *([Keys.ARROW_RIGHT] * 8))
    ram = 'form[name="create-project"] input[name="ramMb"]'
    j.until(lambda: j.find(ram).get_attribute("value") == "40", "RAM at 40 MB")
    assert j.find('form[name="create-project"] output[name="ramMb-value"]').text == "40 MB"
    _tab_to(j, {"form": "create-project", "name": "cpuMillis", "type": "range"})
    _press(j, Keys.HOME, *([Keys.ARROW_RIGHT] * 10), Keys.ARROW_LEFT)
    cpu = 'form[name="create-project"] input[name="cpuMillis"]'
    j.until(lambda: j.find(cpu).get_attribute("value") == "19", "CPU at 19 mCPU")
    _tab_to(j, {"form": "create-project", "tag": "button", "type": "submit"})
    _press(j, Keys.SPACE)
    j.until(lambda: j.all("#projects a.project-name"), "the new project in the list")
    assert "40 MB · 19 mCPU" in j.text("#projects tbody tr")

    # Into the project, by its link.
    j.driver.execute_script("document.activeElement && document.activeElement.blur()")
    _tab_to(j, {"tag": "a", "text": "Web"})
    _press(j, Keys.ENTER)
    j.until(lambda: j.find("#project-name").text == "Web", "the project page")
    # A new page takes focus to its content, so the next Tab starts there.
    j.until(lambda: j.driver.execute_script("return document.activeElement.id") == "main", "focus")
    j.project = {"id": j.driver.current_url.rsplit("/", 1)[-1]}


def _owner(j: Journey) -> dict[str, str]:
    return {"Authorization": f"Bearer {j.token(j.email)}"}


def test_the_signed_in_pages_pass_axe(journey: Journey) -> None:
    j = journey
    audit = Audit(j)
    owner = _owner(j)
    project = f"/v1/projects/{j.project['id']}"
    # Something on every list: a secret, a pending domain, a member, a deployment.
    secret = j.http.put(f"{project}/secrets/GREETING", headers=owner, json={"value": "hi"})
    assert secret.status_code == 200, secret.text
    hostname = f"www.a11y-{secrets.token_hex(3)}.example.com"
    domain = j.http.post(f"{project}/domains", headers=owner, json={"hostname": hostname})
    assert domain.status_code == 200, domain.text
    member = sign_up(j.http, "a11y-member")
    added = j.http.post(
        f"/v1/organizations/{j.org['id']}/members",
        headers=owner,
        json={"email": member.email, "role": "ROLE_DEVELOPER"},
    )
    assert added.status_code == 200, added.text
    deployed = not unavailable_reason()
    if deployed:
        reply = j.http.post(
            f"{project}/deployments",
            headers=owner,
            json={"command": dashboard.APP.format(release="A")},
        )
        assert reply.status_code == 200, reply.text

        def running() -> bool:
            items = j.http.get(f"{project}/deployments", headers=owner).json()["deployments"]
            return bool(items) and items[0]["status"] == "DEPLOYMENT_STATUS_RUNNING"

        wait_for(running, "the deployment running", dashboard.DEPLOY_WAIT_SECONDS)
    else:
        print(f"\n[a11y] no deployment (sandbox missing: {unavailable_reason()})")

    j.open("#/orgs")
    j.visible('form[name="create-org"]')
    audit.page("the organizations page")
    j.open("#/projects")
    j.visible("#projects a.project-name")
    j.visible('form[name="create-project"]')
    audit.page("the projects page")

    j.open(f"#/projects/{j.project['id']}")
    j.until(lambda: len(j.all("#metrics .chart canvas")) == 3, "the metrics charts")
    j.visible("#secrets")
    j.visible("#domains")
    j.visible('form[name="project-settings"] input[name="ramMb"]')
    # The charts' canvases are named images; their newest values are text in the caption.
    names = [c.get_attribute("aria-label") for c in j.all('#metrics canvas[role="img"]')]
    assert len(names) == 3 and all(names), names
    if deployed:
        j.visible("#deployments")
        j.until(lambda: "greeting" in j.text("#logs .line"), "a log line")
        j.until(lambda: "latest: Memory (RSS)" in j.text("#metrics .chart-latest"), "a value")
    audit.page("a project's page")
    j.find("#secrets button.reveal-secret").click()
    j.visible("#secrets button.confirm-reveal")
    audit.page("a project's page, confirming a reveal")

    j.open("#/members")
    j.visible(f'#members tr[data-email="{member.email}"] form[name="member-role"]')
    audit.page("the members page")
    j.open("#/billing")
    j.visible("#pool")
    j.visible('form[name="change-plan"]')
    j.until(lambda: j.all("#invoices") or j.all("#no-invoices"), "the invoices")
    audit.page("the billing page")
    j.open("#/audit")
    j.visible("#audit tbody tr")
    audit.page("the audit log")
    j.open("#/organization")
    j.visible('form[name="rename-org"]')
    audit.page("the organization's settings")
    j.visible("#delete-org").click()
    j.visible("#delete-org-dialog")
    audit.page("the organization's delete dialog")
    _press(j, Keys.ESCAPE)
    j.until(lambda: j.all("#delete-org-dialog") == [], "the dialog closed")
    audit.check()


def test_rename_the_organization(journey: Journey) -> None:
    j = journey
    j.open("#/organization")
    form = 'form[name="rename-org"]'
    j.visible(form)
    # A slug the API refuses: its sentence beside the form.
    j.driver.execute_script(
        "document.querySelector(arguments[0]).removeAttribute('pattern')", f"{form} [name=slug]"
    )
    j.fill("rename-org", {"slug": "Not A Slug"})
    j.submit("rename-org")
    error = j.visible(f"{form} .error")
    assert error.text.endswith(".") and "{" not in error.text, error.text

    renamed = f"Keys Renamed {secrets.token_hex(2)}"
    j.fill("rename-org", {"name": renamed, "slug": j.org["slug"]})
    j.submit("rename-org")
    j.until(lambda: j.find("#org-saved").text == "Saved.", "the form saying it saved")
    switcher = 'select[name="organization"] option:checked'
    j.until(lambda: j.find(switcher).text == renamed, "the new name in the switcher")
    j.until(lambda: renamed in j.find("h1").text, "the new name in the heading")
    got = j.http.get(f"/v1/organizations/{j.org['id']}", headers=_owner(j)).json()
    assert got["name"] == renamed and got["slug"] == j.org["slug"]
    j.org["name"] = renamed
    j.driver.execute_script("window.scrollTo(0, 0)")
    j.screenshot("dashboard-org-settings.png")


def _active(j: Journey) -> dict[str, Any]:
    focused = _focused(j)
    assert focused is not None, "nothing focused"
    return focused


def test_delete_an_empty_organization_from_a_dialog_that_holds_focus(journey: Journey) -> None:
    j = journey
    owner = _owner(j)
    slug = f"empty-{secrets.token_hex(3)}"
    empty = j.http.post("/v1/organizations", headers=owner, json={"name": "Empty", "slug": slug})
    assert empty.status_code == 200, empty.text
    empty_id = empty.json()["id"]
    j.open("#/orgs")
    j.driver.refresh()  # the list is read at log-in; this organization was made through the API
    j.visible(f'li[data-org-id="{empty_id}"] button').click()
    j.until(lambda: j.find("h1").text.startswith("Projects in Empty"), "the empty org current")
    j.open("#/organization")
    j.until(lambda: j.find("#org-projects").text == "0", "no projects")

    # The dialog: opened from the keyboard, focus on its confirm box, Tab and Shift+Tab
    # stay inside, Escape closes it and focus returns to the button that opened it.
    j.driver.execute_script("document.getElementById('delete-org').focus()")
    _press(j, Keys.ENTER)
    j.visible("#delete-org-dialog")
    j.until(lambda: _active(j)["name"] == "confirm", "focus in the dialog")
    assert not j.find("#delete-org-confirm").is_enabled()
    for key in (Keys.TAB, Keys.SHIFT + Keys.TAB):
        for _ in range(5):
            _press(j, key)
            focused = _active(j)
            assert focused["inDialog"] and focused["ring"], focused
    _press(j, Keys.ESCAPE)
    j.until(lambda: j.all("#delete-org-dialog") == [], "the dialog closed")
    j.until(lambda: _active(j)["id"] == "delete-org", "focus back on the opener")

    # Cancel closes it too, focus back again; then delete once the slug is typed.
    _press(j, Keys.SPACE)
    j.until(lambda: _active(j)["name"] == "confirm", "focus in the dialog")
    _tab_to(j, {"id": "delete-org-cancel"})
    _press(j, Keys.ENTER)
    j.until(lambda: j.all("#delete-org-dialog") == [], "the dialog cancelled")
    j.until(lambda: _active(j)["id"] == "delete-org", "focus back on the opener again")
    _press(j, Keys.SPACE)
    j.until(lambda: _active(j)["name"] == "confirm", "focus in the dialog again")
    _type(j, slug[:-1])
    assert not j.find("#delete-org-confirm").is_enabled()
    _type(j, slug[-1])
    j.until(j.find("#delete-org-confirm").is_enabled, "delete enabled by the slug")
    j.screenshot("dashboard-org-delete.png")
    _tab_to(j, {"id": "delete-org-confirm"})
    _press(j, Keys.ENTER)
    j.until(lambda: j.driver.current_url.endswith("#/orgs"), "back to the organizations list")
    j.until(lambda: j.all(f'li[data-org-id="{j.org["id"]}"]'), "the list")
    assert j.all(f'li[data-org-id="{empty_id}"]') == []
    gone = j.http.get(f"/v1/organizations/{empty_id}", headers=owner)
    assert gone.status_code in (403, 404), gone.text
    listed = j.http.get("/v1/organizations", headers=owner).json()["organizations"]
    assert empty_id not in {o["id"] for o in listed}


def test_a_viewer_sees_no_settings_control_and_a_forged_change_is_refused(
    journey: Journey,
) -> None:
    j = journey
    viewer = sign_up(j.http, "org-viewer")
    added = j.http.post(
        f"/v1/organizations/{j.org['id']}/members",
        headers=_owner(j),
        json={"email": viewer.email, "role": "ROLE_VIEWER"},
    )
    assert added.status_code == 200, added.text
    j.open("#/projects")
    j.visible("#logout").click()
    j.visible('form[name="login"]')
    j.fill("login", {"email": viewer.email, "password": PASSWORD})
    j.submit("login")
    j.until(lambda: j.find("#my-role").text == "viewer", "the viewer's projects page")
    j.visible("#nav-org-settings").click()
    j.until(lambda: j.find("#my-role").text == "viewer", "the viewer's settings page")
    j.until(lambda: j.find("#org-name").text == j.org["name"], "the organization's name")
    assert j.all('form[name="rename-org"]') == [] and j.all("#delete-org") == []

    path = f"/v1/organizations/{j.org['id']}"
    forged = j.http.patch(path, headers=viewer.auth, json={"name": "Forged"})
    assert forged.status_code == 403, forged.text
    forged = j.http.delete(path, headers=viewer.auth)
    assert forged.status_code == 403, forged.text
    assert j.http.get(path, headers=_owner(j)).json()["name"] == j.org["name"]
    assert dashboard._console_errors(j) == []


def test_a_platform_admin_s_servers_page_passes_axe(journey: Journey) -> None:
    j = journey
    j.open("#/projects")
    j.visible("#logout").click()
    admin = sign_up(j.http, "a11y-admin")
    _promote(j.stack, admin.email)
    j.visible('form[name="login"]')
    j.fill("login", {"email": admin.email, "password": PASSWORD})
    j.submit("login")
    j.visible("#nav-servers").click()
    if j.stack.server_id:
        j.visible(f'#servers tr[data-server-id="{j.stack.server_id}"]')
    else:
        j.until(lambda: j.all("#servers") or "No servers" in j.text("main"), "the servers")
    audit = Audit(j)
    audit.page("the servers page")
    audit.check()
