"""The container files: a Dockerfile parser and the image rules (lint_dockerfile, pip_installs)."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from .common import _image_problem


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their first line number; continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        line = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = line.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if buffer:
        line = " ".join(buffer)
        keyword, _, args = line.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|(^|_)KEY($|_)|APIKEY)", re.I)
_SECRET_PATH = re.compile(r"(^|/)(pki|secrets?|\.ssh|\.env)(/|$)|\.(key|pem|crt|p12|pfx|jks)$|id_(rsa|ed25519|ecdsa)",
                          re.I)


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _exec_or_shell(args: str) -> list[str]:
    if args.startswith("["):
        try:
            value = json.loads(args)
            if isinstance(value, list):
                return [str(v) for v in value]
        except json.JSONDecodeError:
            pass
    try:
        return shlex.split(args)
    except ValueError:
        return args.split()


def _key_values(args: str) -> list[tuple[str, str]]:
    """ENV/LABEL/ARG operands: `K=V K2="v 2"` or the legacy `K V`."""
    words = _exec_or_shell(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) if "=" in w else (w, "") for w in words]


def _secret_operands(ins: Instruction) -> list[str]:
    pairs = _key_values(ins.args) if ins.keyword == "ENV" else \
        [tuple(w.split("=", 1)) if "=" in w else (w, "") for w in _exec_or_shell(ins.args)]
    problems = []
    for name, value in pairs:
        if _SECRET_NAME.search(name):
            problems.append(f"line {ins.line}: {ins.keyword} {name}: secrets must not be baked into an image "
                            "(mount them at run time)")
        elif "-----BEGIN" in value:
            problems.append(f"line {ins.line}: {ins.keyword} {name} holds PEM material")
    return problems


def lint_dockerfile(text: str) -> list[str]:
    """The container-file rules: pinned base images (a tag that is not 'latest', or a digest), a
    numeric non-root USER before CMD/ENTRYPOINT and in force at the end, a HEALTHCHECK, no COPY/ADD
    of key or certificate material or of the whole context, no remote ADD, no secret-named ENV/ARG."""
    problems: list[str] = []
    instructions = parse_dockerfile(text)
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    stage: dict | None = None
    for ins in instructions:
        if ins.keyword == "ARG" and stage is None:
            for word in _exec_or_shell(ins.args):
                if "=" in word:  # an ARG without a default stays unresolved
                    name, value = word.split("=", 1)
                    global_args[name] = value
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if not words:
                problems.append(f"line {ins.line}: FROM without an image")
                continue
            image = _expand(words[0], global_args)
            alias = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            parent = stages.get(image.lower())
            stage = {"user": parent["user"] if parent else None,
                     "healthcheck": parent["healthcheck"] if parent else False, "line": ins.line}
            if parent is None and image != "scratch":
                if "$" in image:
                    problems.append(f"line {ins.line}: base image {words[0]!r} is not pinned (unresolved ARG)")
                else:
                    problem = _image_problem(image)
                    if problem:
                        problems.append(f"line {ins.line}: base {problem}")
            if alias:
                stages[alias] = stage
            continue
        if stage is None and ins.keyword == "ARG":
            problems.extend(_secret_operands(ins))
            continue
        if stage is None:
            if ins.keyword not in ("ARG",):
                problems.append(f"line {ins.line}: {ins.keyword} before the first FROM")
            continue
        if ins.keyword == "USER":
            user = _expand(ins.args.split()[0] if ins.args else "", global_args)
            uid = user.split(":", 1)[0]
            if not uid.isdigit():
                problems.append(f"line {ins.line}: USER {user!r}: use a numeric UID (Kubernetes can then "
                                "verify runAsNonRoot)")
            elif int(uid) == 0:
                problems.append(f"line {ins.line}: USER {user!r} is root")
            stage["user"] = uid
        elif ins.keyword in ("CMD", "ENTRYPOINT"):
            if stage["user"] is None or not stage["user"].isdigit() or int(stage["user"]) == 0:
                problems.append(f"line {ins.line}: {ins.keyword} before a non-root USER is set")
        elif ins.keyword == "HEALTHCHECK":
            stage["healthcheck"] = ins.args.split()[0].upper() != "NONE" if ins.args else False
        elif ins.keyword in ("COPY", "ADD"):
            words = [w for w in _exec_or_shell(ins.args) if not w.startswith("--")]
            from_stage = any(w.startswith("--from") for w in _exec_or_shell(ins.args))
            for source in words[:-1]:
                if ins.keyword == "ADD" and re.match(r"(https?|git)://|git@", source):
                    problems.append(f"line {ins.line}: ADD of remote content {source!r} (unpinned, unverified)")
                if _SECRET_PATH.search(source):
                    problems.append(f"line {ins.line}: {ins.keyword} {source!r} would bake key or certificate "
                                    "material into the image")
                if not from_stage and source.rstrip("/") in (".", "./", "*"):
                    problems.append(f"line {ins.line}: {ins.keyword} {source!r} copies the whole build context "
                                    "(any key in the working tree would be baked in): copy named folders")
        elif ins.keyword in ("ENV", "ARG"):
            problems.extend(_secret_operands(ins))
    if stage is None:
        problems.append("no FROM")
        return problems
    if stage["user"] is None or not stage["user"].isdigit() or int(stage["user"]) == 0:
        problems.append("the final stage does not run as a numeric non-root USER")
    if not stage["healthcheck"]:
        problems.append("the final stage has no HEALTHCHECK")
    return problems


def pip_installs(text: str) -> list[str]:
    """The `pip install` commands of RUN instructions, in order (for the torch-first rule)."""
    found = []
    for ins in parse_dockerfile(text):
        if ins.keyword == "RUN":
            for part in re.split(r"&&|;", ins.args):
                if re.search(r"\bpip3?\s+install\b|-m\s+pip\s+install\b", part):
                    found.append(" ".join(part.split()))
    return found
