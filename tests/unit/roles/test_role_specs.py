"""Every role's meta/argument_specs.yml, defaults/main.yml and README agree.

For each role: every option of every entry point is typed and described; an option with a default has
the same value in defaults/main.yml (and the same one in every entry point that declares it); a required
option has none there; every variable in defaults/main.yml is some entry point's option; the README's
variable table lists every option once, with its default (verbatim in one code span, `|` written `\\|`;
`required` for a required option) and nothing that is not an option. Defaults stay inside the role: none
reaches out through role_path (an installed collection has no checkout around it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[3] / "roles"
# An unescaped | splits a Markdown table row; `\|` stays inside a cell.
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_CODE_SPAN = re.compile(r"^`([^`]*)`$")
_ROLE_PATH_ESCAPE = re.compile(r"role_path\s*}}\s*/\s*\.\.")


def _load(path: Path) -> dict:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def readme_table(text: str) -> dict[str, list[str]]:
    """The README's variable tables (header `| variable | default | ...`): name -> default cells (one per row)."""
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in _CELL_SPLIT.split(stripped.strip("|"))]
        if cells and cells[0].lower() == "variable":
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        match = _CODE_SPAN.match(cells[0])
        if match and len(cells) > 1:
            rows.setdefault(match.group(1), []).append(cells[1])
    return rows


def readme_default_matches(cell: str, value: object) -> bool:
    match = _CODE_SPAN.match(cell)
    if not match:
        return False
    text = match.group(1).replace("\\|", "|")
    if isinstance(value, str) and text == value:
        return True
    try:
        return yaml.safe_load(text) == value
    except yaml.YAMLError:
        return False


def role_problems(role_dir: Path) -> list[str]:
    """Every disagreement between the role's specs, defaults and README, as sentences."""
    role = role_dir.name
    problems: list[str] = []
    specs = _load(role_dir / "meta" / "argument_specs.yml").get("argument_specs") or {}
    defaults = _load(role_dir / "defaults" / "main.yml")
    readme_path = role_dir / "README.md"
    readme = readme_table(readme_path.read_text()) if readme_path.is_file() else {}
    if not specs:
        return [f"{role}: no meta/argument_specs.yml entry points"]

    options: dict[str, dict] = {}
    for entry, spec in specs.items():
        for name, option in ((spec or {}).get("options") or {}).items():
            where = f"{role}: {entry}.{name}"
            for key in ("type", "description"):
                if key not in option:
                    problems.append(f"{where} has no {key}")
            if option.get("required") and "default" in option:
                problems.append(f"{where} is required and has a default")
            if not option.get("required") and "default" not in option:
                problems.append(f"{where} is neither required nor has a default")
            if name in options and options[name].get("default") != option.get("default"):
                problems.append(f"{where}: default {option.get('default')!r} differs from another entry point's")
            options.setdefault(name, option)

    for name, option in options.items():
        if "default" in option:
            if name not in defaults:
                problems.append(f"{role}: {name} has a spec default but is not in defaults/main.yml")
            elif defaults[name] != option["default"]:
                problems.append(
                    f"{role}: {name} is {defaults[name]!r} in defaults/main.yml"
                    f" but {option['default']!r} in argument_specs"
                )
        elif name in defaults:
            problems.append(f"{role}: {name} is required in argument_specs but has a value in defaults/main.yml")
    for name in defaults:
        if name not in options:
            problems.append(f"{role}: {name} is in defaults/main.yml but in no argument_specs entry point")
    for name, value in defaults.items():
        if isinstance(value, str) and _ROLE_PATH_ESCAPE.search(value):
            problems.append(f"{role}: {name} reaches outside the role ({value})")

    for name, option in options.items():
        cells = readme.get(name)
        if not cells:
            problems.append(f"{role}: {name} is not in the README's variable table")
            continue
        if len(cells) > 1:
            problems.append(f"{role}: {name} is in the README's variable table {len(cells)} times")
        if option.get("required"):
            if cells[0] != "required":
                problems.append(f"{role}: {name} is required; the README says {cells[0]} (write: required)")
        elif not readme_default_matches(cells[0], option["default"]):
            problems.append(f"{role}: README gives {name} the default {cells[0]}, argument_specs {option['default']!r}")
    for name in readme:
        if name not in options:
            problems.append(f"{role}: the README lists {name}, which is no option of the role")
    return problems


@pytest.mark.parametrize("role_dir", sorted(p for p in ROLES.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_specs_defaults_and_readme_agree(role_dir: Path) -> None:
    assert role_problems(role_dir) == []


def test_no_role_variable_shadows_a_common_argument() -> None:
    """A role's vars/defaults outrank _common's defaults: one named like an argument would override it."""
    specs = _load(ROLES / "_common" / "meta" / "argument_specs.yml")["argument_specs"]
    arguments = {name for spec in specs.values() for name in (spec.get("options") or {})}
    shadowing = {
        f"{role_dir.name}/{kind}/main.yml: {name}"
        for role_dir in ROLES.iterdir()
        if role_dir.is_dir() and role_dir.name != "_common"
        for kind in ("defaults", "vars")
        for name in _load(role_dir / kind / "main.yml")
        if name in arguments
    }
    assert not shadowing


# The checker itself, on a made-up role with one disagreement of each kind.
def _write_role(tmp_path: Path, spec: dict, defaults: dict, readme: str) -> Path:
    role = tmp_path / "demo"
    (role / "meta").mkdir(parents=True)
    (role / "defaults").mkdir()
    (role / "meta" / "argument_specs.yml").write_text(yaml.safe_dump({"argument_specs": {"main": {"options": spec}}}))
    (role / "defaults" / "main.yml").write_text(yaml.safe_dump(defaults))
    (role / "README.md").write_text(readme)
    return role


_GOOD_SPEC = {
    "demo_port": {"type": "int", "description": "Port.", "default": 8001},
    "demo_url": {"type": "str", "description": "URL.", "default": "{{ demo_host | default('x') }}:1"},
    "demo_name": {"type": "str", "description": "Name.", "required": True},
}
_GOOD_DEFAULTS = {"demo_port": 8001, "demo_url": "{{ demo_host | default('x') }}:1"}
_GOOD_README = """# demo

| variable | default | meaning |
|---|---|---|
| `demo_port` | `8001` | port |
| `demo_url` | `{{ demo_host \\| default('x') }}:1` | url |
| `demo_name` | required | name |

| feature | wheel | note |
|---|---|---|
| `not_a_variable` | `x` | other tables are not variable tables |
"""


def test_checker_accepts_an_agreeing_role(tmp_path: Path) -> None:
    assert role_problems(_write_role(tmp_path, _GOOD_SPEC, _GOOD_DEFAULTS, _GOOD_README)) == []


@pytest.mark.parametrize(
    ("spec", "defaults", "readme", "expected"),
    [
        (_GOOD_SPEC, {**_GOOD_DEFAULTS, "demo_port": 8002}, _GOOD_README, "demo_port is 8002 in defaults/main.yml"),
        (_GOOD_SPEC, {**_GOOD_DEFAULTS, "demo_extra": 1}, _GOOD_README, "demo_extra is in defaults/main.yml but in no"),
        (_GOOD_SPEC, {"demo_url": _GOOD_DEFAULTS["demo_url"]}, _GOOD_README, "demo_port has a spec default but is not"),
        (_GOOD_SPEC, {**_GOOD_DEFAULTS, "demo_name": "x"}, _GOOD_README, "demo_name is required in argument_specs"),
        (_GOOD_SPEC, _GOOD_DEFAULTS, _GOOD_README.replace("`8001`", "`8002`"), "README gives demo_port the default"),
        (
            _GOOD_SPEC,
            _GOOD_DEFAULTS,
            _GOOD_README.replace("| `demo_port` | `8001` | port |\n", ""),
            "demo_port is not in",
        ),
        (
            _GOOD_SPEC,
            _GOOD_DEFAULTS,
            _GOOD_README.replace("| name |\n", "| name |\n| `demo_gone` | `1` | stale |\n"),
            "lists demo_gone",
        ),
        (
            _GOOD_SPEC,
            _GOOD_DEFAULTS,
            _GOOD_README.replace("| required |", "| `x` |"),
            "demo_name is required; the README",
        ),
        (
            {**_GOOD_SPEC, "demo_port": {"description": "Port.", "default": 8001}},
            _GOOD_DEFAULTS,
            _GOOD_README,
            "main.demo_port has no type",
        ),
        (
            {
                **_GOOD_SPEC,
                "demo_dir": {"type": "path", "description": "D.", "default": "{{ role_path }}/../../.cache"},
            },
            {**_GOOD_DEFAULTS, "demo_dir": "{{ role_path }}/../../.cache"},
            _GOOD_README.replace("| name |\n", "| name |\n| `demo_dir` | `{{ role_path }}/../../.cache` | d |\n"),
            "demo_dir reaches outside the role",
        ),
    ],
    ids=[
        "default-differs",
        "default-without-spec",
        "spec-default-missing",
        "required-with-default",
        "readme-default-differs",
        "readme-missing",
        "readme-stale",
        "readme-required",
        "untyped",
        "role-path-escape",
    ],
)
def test_checker_reports_each_disagreement(
    tmp_path: Path, spec: dict, defaults: dict, readme: str, expected: str
) -> None:
    problems = role_problems(_write_role(tmp_path, spec, defaults, readme))
    assert any(expected in p for p in problems), problems
