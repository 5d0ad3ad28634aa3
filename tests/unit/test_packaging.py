"""What a fresh install reads: pyproject.toml's Python floor and README's steps for Windows, which no CI runs."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Standard-library modules the package may import, with the Python that first has them.
STDLIB_SINCE = {"tomllib": (3, 11)}


def python_floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert match, f"requires-python {spec!r} is not of the form '>=3.N'"
    return 3, int(match.group(1))


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return modules


def test_requires_python_admits_no_python_that_lacks_an_imported_module():
    """pip installed sdbridge on Python 3.10 (A1111's Python on many Windows machines), where every command then
    died on `import tomllib` (QA 44 F1): the floor must be where the package can run."""
    floor = python_floor()
    too_new = sorted(f"{path.relative_to(ROOT)} imports {module} (Python {since[0]}.{since[1]})"
                     for path in (ROOT / "sdbridge").rglob("*.py")
                     for module, since in STDLIB_SINCE.items()
                     if module in imported_modules(path) and since > floor)
    assert not too_new, f"requires-python allows {floor[0]}.{floor[1]}, but " + "; ".join(too_new)


def windows_block() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Windows and macOS without make", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\w*\n(.*?)```", section, re.S)
    assert block, "README's Windows section has no command block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def makefile_spec(name: str) -> str:
    match = re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert match, f"Makefile sets no {name}"
    return match.group(1).strip()


def test_readme_windows_steps_paste_into_cmd_and_match_the_makefile():
    """The steps are pasted into a Command Prompt: a trailing `# comment` went to pip as arguments there and
    nothing installed (QA 44 F6), and an unquoted `>` is a redirect. They install what `make install` does."""
    lines = windows_block()
    for line in lines:
        assert " #" not in line and not line.startswith("#"), f"cmd.exe passes a comment on to the command: {line}"
        unquoted = re.sub(r'"[^"]*"', "", line)
        assert not re.search(r"[<>|&^]", unquoted), f"cmd.exe reads a character of this line as its own: {line}"
    installs = [shlex.split(line.replace("\\", "/")) for line in lines if " install " in line]
    for words in installs:
        assert words[1:3] == ["-m", "pip"], f"pip.exe cannot upgrade itself on Windows: use python -m pip: {words}"
    assert any("--upgrade" in words and words[-1] == "pip" for words in installs), "pip is not upgraded first"
    torch_at = next(i for i, words in enumerate(installs) if makefile_spec("TORCH_SPEC") in words)
    project_at = next(i for i, words in enumerate(installs) if "-e" in words)
    assert torch_at < project_at, "torch must go in before the project, so that pip keeps its build"
    without_deps = [word for words in installs if "--no-deps" in words for word in words]
    for spec in (makefile_spec("OPEN_CLIP_SPEC"), makefile_spec("SPANDREL_SPEC"), "einops>=0.7"):
        assert spec in without_deps, f"{spec} is not installed with --no-deps as the Makefile installs it"
    assert "einops>=0.7" in (ROOT / "Makefile").read_text(encoding="utf-8")


def test_install_hints_quote_extras_as_every_shell_reads_them():
    """`pip install 'sdbridge[spout]'` reached pip with its single quotes from cmd.exe (QA 44 F11): double quotes
    work in cmd.exe, PowerShell and sh."""
    texts = [*(ROOT / "sdbridge").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md",
             *(ROOT / "examples").rglob("*.md")]
    single = [f"{path.relative_to(ROOT)}:{number}" for path in texts
              for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
              if re.search(r"install '[^']*\[", line)]
    assert not single, "single-quoted extras: " + ", ".join(single)


def test_every_make_rule_that_runs_sdbridge_passes_args():
    """QA 87 F12: `make doctor ARGS="--model sd-turbo"` checked the no-model set-up, while `make run ARGS=...` served
    the model: both rules hand ARGS on."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    rules = re.findall(r"^([\w-]+):.*\n((?:\t.*\n)+)", makefile, re.M)
    commands = {name: recipe for name, recipe in rules if "/sdbridge " in recipe}
    assert {"run", "doctor"} <= set(commands), f"no run or doctor rule calling sdbridge: {sorted(commands)}"
    for name, recipe in commands.items():
        assert recipe.rstrip().endswith("$(ARGS)"), f"make {name} drops ARGS: {recipe.strip()}"
