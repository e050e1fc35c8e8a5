"""``specdec-sidecar inject``: put the sidecar in front of vLLM in the manifests users already have.

Reads Kubernetes manifests (files or stdin; multi-document YAML; ``List`` objects) and writes them back with
the sidecar added to every pod template whose container runs vLLM's OpenAI server. Port takeover: the
sidecar listens on the port vLLM served on (the container port keeps its name, so Services, routers that
dial pod IPs, InferencePools and KServe's queue-proxy reach the sidecar), vLLM moves to ``127.0.0.1`` on
``--vllm-port`` (8001) and the sidecar's ``--upstream`` points there. Works as a Helm post-renderer (stdin
to stdout). Every change is recorded in the annotation ``specdec.io/injected`` on the object, so injecting
again first takes the old injection out (injecting twice changes nothing) and ``--uninject`` gives back the
original fields in their original order. Documents with nothing to inject are written back byte for byte.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sidecar import __version__
from sidecar.commands import inject_shell
from sidecar.commands.inject_shell import ShellError
from sidecar.config import ExitCode

ANNOTATION_INJECT = "specdec.io/inject"
ANNOTATION_VLLM_PORT = "specdec.io/vllm-port"
ANNOTATION_SIDECAR_ARGS = "specdec.io/sidecar-args"
ANNOTATION_RECORD = "specdec.io/injected"
SIDECAR_NAME = "specdec-sidecar"
TMP_VOLUME = "specdec-tmp"
METRICS_PORT_NAME = "specdec-metrics"
LOOPBACK = "127.0.0.1"
VLLM_DEFAULT_PORT = 8000  # vLLM's own default for --port
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# flags the sidecar's address settings come from; a sidecar-args entry must not set them
RESERVED_SIDECAR_FLAGS = {"--upstream", "--proxy-port", "--proxy-host", "--metrics-port", "--metrics-host"}

Path = list  # a path of keys and list indices from an object's root


class InjectError(ValueError):
    """Bad input (YAML, an annotation, a flag): one line on stderr, nothing on stdout."""


class Skip(Exception):
    """This object cannot be injected with certainty: a warning names it and it passes through."""


# ---------------------------------------------------------------- settings


@dataclass
class Options:
    image: str = f"specdec-sidecar:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    vllm_port: int = 8001
    metrics_port: int = 9464
    sidecar_args: list[str] = field(default_factory=list)
    native: bool = True
    requests: dict[str, str] = field(default_factory=lambda: {"cpu": "50m", "memory": "64Mi"})
    limits: dict[str, str] = field(default_factory=lambda: {"memory": "256Mi"})
    uninject: bool = False


def _port(value: object, what: str) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise InjectError(f"{what} must be a port number (1-65535), got {value!r}")
    return int(text)


def _quantities(text: str, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name or not re.fullmatch(r"[0-9.]+[A-Za-z]*", value):
            raise InjectError(f"{flag} takes name=quantity pairs separated by commas (e.g. cpu=50m,memory=64Mi), got {item!r}")
        out[name] = value
    return out


def check_sidecar_args(args: list[str], where: str) -> None:
    """Every entry a ``serve`` flag of the sidecar (``--name=value`` or ``--name value``), none of the
    address flags inject sets itself. Values are checked by the sidecar when it starts."""
    from sidecar.config import Settings

    known = {"--" + name.replace("_", "-") for name in Settings.model_fields}
    i = 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag not in known:
            raise InjectError(f"{where}: {args[i]!r} is not a flag of `specdec-sidecar serve`")
        if flag in RESERVED_SIDECAR_FLAGS:
            raise InjectError(f"{where}: {flag} is set by inject itself (use --vllm-port / --metrics-port)")
        if "=" not in args[i] and i + 1 >= len(args):
            raise InjectError(f"{where}: {args[i]} needs a value")
        i += 1 if "=" in args[i] else 2


# ---------------------------------------------------------------- YAML in and out

try:
    import yaml
except ImportError:  # pragma: no cover - pyyaml is a dependency
    yaml = None  # type: ignore[assignment]


def _loader():
    class Loader(yaml.SafeLoader):
        """Safe YAML 1.1 (as Kubernetes reads manifests), timestamps kept as the strings they are."""

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return Loader


def _dumper():
    class Dumper(yaml.SafeDumper):
        pass

    def string(dumper, value: str):
        if "\n" in value:
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
        return dumper.represent_scalar("tag:yaml.org,2002:str", value)

    Dumper.add_representer(str, string)
    return Dumper


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_dumper(), sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=1 << 30)  # fmt: skip


@dataclass
class Document:
    obj: Any
    start: int  # span of the root node in the source text (None for an empty document)
    end: int


def parse_stream(text: str, source: str) -> list[Document]:
    """Every document of *text* with the span of its root node; InjectError (one line) on bad YAML."""
    docs: list[Document] = []
    loader = _loader()(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            obj = loader.construct_document(node)
            docs.append(Document(obj, node.start_mark.index, node.end_mark.index))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        message = f"{context}, {problem}" if context else problem
        raise InjectError(f"{where}: not valid YAML: {' '.join(str(message).split())}") from None
    finally:
        loader.dispose()
    return docs


def render_stream(text: str, docs: list[Document], changed: list[bool]) -> str:
    """*text* with the root node of each changed document replaced by its new YAML; everything else
    (comments, separators, untouched documents) byte for byte."""
    out = []
    pos = 0
    for doc, is_changed in zip(docs, changed, strict=True):
        if not is_changed:
            continue
        out.append(text[pos : doc.start])
        new = dump(doc.obj)
        line_start = text.rfind("\n", 0, doc.start) + 1
        if text[line_start : doc.start].strip():  # the node began on a `--- ` line
            new = "\n" + new
        out.append(new)
        pos = doc.end
        if text[pos : pos + 1] == "\n" and not text[line_start:pos].endswith("\n"):
            pos += 1  # a root that ended mid-line: the dump already ends its line
    out.append(text[pos:])
    return "".join(out)


# ---------------------------------------------------------------- recorded changes


def _get(root: Any, path: Path) -> Any:
    for key in path:
        root = root[key]
    return root


class Recorder:
    """Changes to one object, each with what it replaced, so that :func:`restore` undoes them exactly."""

    def __init__(self, root: dict) -> None:
        self.root = root
        self.ops: list[dict] = []

    def set(self, path: Path, key: str, value: Any) -> None:
        parent = _get(self.root, path)
        op: dict[str, Any] = {"op": "set", "path": list(path), "key": key}
        if key in parent:
            op["was"] = copy.deepcopy(parent[key])
        else:
            op["absent"] = True
        self.ops.append(op)
        parent[key] = value

    def delete(self, path: Path, key: str) -> None:
        parent = _get(self.root, path)
        self.ops.append({"op": "set", "path": list(path), "key": key, "was": copy.deepcopy(parent[key]),
                         "order": list(parent)})  # fmt: skip
        del parent[key]

    def append(self, path: Path, key: str, item: dict) -> None:
        parent = _get(self.root, path)
        if parent.get(key) is None:
            self.set(path, key, [])
        parent[key].append(item)
        self.ops.append({"op": "append", "path": [*path, key], "name": item["name"]})


def restore(obj: dict, ops: list[dict]) -> None:
    for op in reversed(ops):
        if op["op"] == "append":
            items = _get(obj, op["path"])
            index = max(i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == op["name"])
            del items[index]
            continue
        parent = _get(obj, op["path"])
        if op.get("absent"):
            parent.pop(op["key"], None)
        else:
            parent[op["key"]] = op["was"]
        if "order" in op:
            ordered = {k: parent[k] for k in op["order"] if k in parent}
            ordered.update({k: v for k, v in parent.items() if k not in ordered})
            parent.clear()
            parent.update(ordered)


# ---------------------------------------------------------------- finding vLLM


@dataclass
class Server:
    """Where one container starts vLLM's OpenAI server."""

    container_index: int
    # argv servers: the flat argv (command + args) and where the server's arguments start in it
    argv: list[str] | None = None
    start: int = 0
    # shell servers: the index of the script in argv, and the script's server command
    script_index: int | None = None
    script: inject_shell.ScriptServer | None = None


def _strings(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _image_runs_server(image: Any) -> bool:
    """vLLM's own images (vllm/vllm-openai and its CPU/ROCm siblings) start the server as entrypoint."""
    if not isinstance(image, str):
        return False
    name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return name.startswith("vllm-openai")


def find_server(container: dict, index: int) -> Server | None:
    """The vLLM OpenAI server in *container*, None when it runs something else; Skip when it runs it in a
    way that cannot be rewritten for certain."""
    command, args = _strings(container.get("command")), _strings(container.get("args"))
    if command is None or args is None:
        return None
    argv = command + args
    script_at = inject_shell.shell_script_index(argv)
    if script_at is not None:
        try:
            server = inject_shell.find_server(argv[script_at])
        except ShellError as error:
            if re.search(r"vllm(\s+serve|\.entrypoints\.openai\.api_server)", argv[script_at]):
                raise Skip(f"container {container.get('name')!r} starts vLLM in a shell script that cannot be "
                           f"rewritten ({error})") from None  # fmt: skip
            return None
        if server is None:
            return None
        return Server(index, argv=argv, script_index=script_at, script=server)
    start = inject_shell.server_args_start(argv)
    if start is None and not command and _image_runs_server(container.get("image")):
        start = 0
    if start is None:
        return None
    return Server(index, argv=argv, start=start)


# ---------------------------------------------------------------- what changes in vLLM's arguments


@dataclass
class ArgEdits:
    replace: dict[int, str]  # index in the server's argument list -> new value
    append: list[str]
    serving_port: int
    speculative: bool
    api_key: str | None
    headless: bool = False
    notes: list[str] = field(default_factory=list)


def _flag(arg: str) -> str | None:
    """``--some_flag.key=v`` -> ``--some-flag`` (vLLM takes both spellings and dotted sub-keys)."""
    if not arg.startswith("--"):
        return None
    name = arg[2:].split("=", 1)[0].split(".", 1)[0]
    return "--" + name.replace("_", "-")


def plan_edits(values: list[str], dynamic: list[bool], vllm_port: int) -> ArgEdits:
    """How vLLM's arguments change: ``--host 127.0.0.1``, ``--port <vllm port>`` (replaced where given,
    appended otherwise), the per-request metrics flag when speculation is configured and
    ``--enable-force-include-usage``, each unless already there."""
    replace: dict[int, str] = {}
    seen: set[str] = set()
    serving_port = VLLM_DEFAULT_PORT
    speculative = False
    api_key = None
    notes = []
    i = 0
    while i < len(values):
        arg = values[i]
        flag = _flag(arg)
        if arg == "-sc" or arg.startswith("-sc="):
            speculative = True
        if flag is None:
            i += 1
            continue
        seen.add(flag)
        inline = "=" in arg and "." not in arg[: arg.index("=")]
        value_index = None if inline else i + 1
        value = arg.split("=", 1)[1] if inline else (values[i + 1] if i + 1 < len(values) else None)
        if flag in ("--speculative-config", "--spec-method", "--spec-model", "--spec-tokens"):
            speculative = True
        elif flag == "--port":
            if value is None or (value_index is not None and dynamic[value_index]) or "$" in value:
                raise Skip("vLLM's --port comes from a variable; the port it serves on is unknown")
            serving_port = _port(value, "vLLM's --port") if re.fullmatch(r"\d+", value.strip()) else None
            if serving_port is None:
                raise Skip(f"vLLM's --port {value!r} is not a number")
            if inline:
                replace[i] = f"--port={vllm_port}"
            else:
                replace[i + 1] = str(vllm_port)
        elif flag == "--host":
            if inline:
                replace[i] = f"--host={LOOPBACK}"
            elif value is not None:
                replace[i + 1] = LOOPBACK
        elif flag == "--uds":
            raise Skip("vLLM listens on a unix socket (--uds)")
        elif flag in ("--ssl-keyfile", "--ssl-certfile"):
            raise Skip("vLLM serves TLS itself; the sidecar talks plain HTTP to it")
        elif flag == "--headless":
            return ArgEdits({}, [], serving_port, speculative, None, headless=True)
        elif flag == "--config":
            notes.append("vLLM reads a --config file: a port or host set there is overridden by the command line")
        elif flag == "--api-key" and value is not None and "$" not in value:
            api_key = value
        if not inline and flag in ("--port", "--host", "--config", "--api-key", "--speculative-config",
                                   "--spec-method", "--spec-model", "--spec-tokens", "--uds"):  # fmt: skip
            i += 2
        else:
            i += 1
    append: list[str] = []
    if "--host" not in seen:
        append += ["--host", LOOPBACK]
    if "--port" not in seen:
        append += ["--port", str(vllm_port)]
    if speculative and "--per-request-spec-decode-metrics" not in seen:
        append += ["--per-request-spec-decode-metrics", "summary"]
    if not seen & {"--enable-force-include-usage", "--no-enable-force-include-usage"}:
        append += ["--enable-force-include-usage"]
    return ArgEdits(replace, append, serving_port, speculative, api_key, notes=notes)


# ---------------------------------------------------------------- the pod templates of each kind

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
KSERVE_RUNTIMES = {"ServingRuntime", "ClusterServingRuntime"}


@dataclass
class Template:
    spec: Path  # the pod spec (has "containers")
    meta: Path | None  # the pod template's metadata, for annotations
    native: bool  # may the sidecar be an init container here


def templates(obj: dict) -> list[Template]:
    kind = obj.get("kind")
    api = str(obj.get("apiVersion", ""))
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return []
    found: list[Template] = []

    def pod_template(path: Path, native: bool = True) -> None:
        try:
            node = _get(obj, path)
        except (KeyError, IndexError, TypeError):
            return
        if isinstance(node, dict) and isinstance(node.get("spec"), dict) and isinstance(node["spec"].get("containers"), list):
            found.append(Template([*path, "spec"], [*path, "metadata"], native))

    if kind == "Pod":
        if isinstance(spec.get("containers"), list):
            found.append(Template(["spec"], None, True))
    elif kind == "CronJob":
        pod_template(["spec", "jobTemplate", "spec", "template"])
    elif kind == "LeaderWorkerSet":
        pod_template(["spec", "leaderWorkerTemplate", "leaderTemplate"])
        pod_template(["spec", "leaderWorkerTemplate", "workerTemplate"])
    elif api.startswith("serving.kserve.io/") and kind in KSERVE_RUNTIMES:
        # a ServingRuntime's pod spec has no init containers: the sidecar is an ordinary container
        if isinstance(spec.get("containers"), list):
            found.append(Template(["spec"], None, False))
    elif api.startswith("serving.kserve.io/") and kind == "InferenceService":
        # Knative (KServe's default mode) refuses init containers unless a feature flag is on
        predictor = spec.get("predictor")
        if isinstance(predictor, dict) and isinstance(predictor.get("containers"), list):
            found.append(Template(["spec", "predictor"], None, False))
    elif kind in WORKLOADS or isinstance(spec.get("template"), dict):
        pod_template(["spec", "template"])
    return found


# ---------------------------------------------------------------- one pod template


def _describe(obj: dict) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name", "<unnamed>")
    ns = meta.get("namespace")
    return f"{obj.get('kind', '<no kind>')} {ns + '/' if ns else ''}{name}"


def _annotations(obj: dict, template: Template) -> dict[str, str]:
    merged: dict[str, str] = {}
    for path in (["metadata"], template.meta):
        if path is None:
            continue
        try:
            meta = _get(obj, path)
        except (KeyError, TypeError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("annotations"), dict):
            merged.update({k: str(v) for k, v in meta["annotations"].items()})
    return merged


def _declared_ports(spec: dict) -> list[tuple[int, dict]]:
    out = []
    for group in ("initContainers", "containers"):
        for ci, c in enumerate(spec.get(group) or []):
            for p in c.get("ports") or []:
                if isinstance(p, dict):
                    out.append((ci if group == "containers" else -1, p))
    return out


def _probe_command(python: str, probe: dict, vllm_port: int) -> dict:
    timeout = probe.get("timeoutSeconds", 1)
    if "httpGet" in probe:
        get = probe["httpGet"]
        path = get.get("path") or "/"
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or [] if "name" in h}
        url = f"http://{LOOPBACK}:{vllm_port}{path if path.startswith('/') else '/' + path}"
        if headers:
            code = (f"import urllib.request; urllib.request.urlopen(urllib.request.Request({url!r}, "
                    f"headers={headers!r}), timeout={timeout})")  # fmt: skip
        else:
            code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout={timeout})"
    else:
        code = f"import socket; socket.create_connection(({LOOPBACK!r}, {vllm_port}), timeout={timeout}).close()"
    return {"command": [python, "-c", code]}


def inject_template(obj: dict, template: Template, rec: Recorder, opts: Options, annotations: dict) -> bool:
    spec = _get(obj, template.spec)
    containers = spec["containers"]
    everyone = [c for c in (spec.get("initContainers") or []) + containers if isinstance(c, dict)]
    if any(c.get("name") == SIDECAR_NAME for c in everyone):
        return False  # already there, put in by someone else (e.g. this project's chart)
    servers = [s for i, c in enumerate(containers) if isinstance(c, dict) and (s := find_server(c, i))]
    if not servers:
        return False
    if len(servers) > 1:
        raise Skip(f"{len(servers)} containers run vLLM's server; inject handles one per pod")
    server = servers[0]
    container = containers[server.container_index]
    cpath = [*template.spec, "containers", server.container_index]

    vllm_port = opts.vllm_port
    if ANNOTATION_VLLM_PORT in annotations:
        vllm_port = _port(annotations[ANNOTATION_VLLM_PORT], f"{_describe(obj)}: annotation {ANNOTATION_VLLM_PORT}")
    extra = list(opts.sidecar_args)
    if ANNOTATION_SIDECAR_ARGS in annotations:
        try:
            more = shlex.split(annotations[ANNOTATION_SIDECAR_ARGS])
        except ValueError as error:
            raise InjectError(f"{_describe(obj)}: annotation {ANNOTATION_SIDECAR_ARGS}: {error}") from None
        check_sidecar_args(more, f"{_describe(obj)}: annotation {ANNOTATION_SIDECAR_ARGS}")
        extra += more

    # vLLM's arguments
    if server.script is not None:
        words = server.script.args
        edits = plan_edits([w.value for w in words], [w.dynamic for w in words], vllm_port)
    else:
        values = server.argv[server.start :]
        edits = plan_edits(values, ["$(" in v for v in values], vllm_port)
    if edits.headless:
        return False
    serving = edits.serving_port
    metrics = opts.metrics_port
    if serving == vllm_port:
        raise Skip(f"vLLM already serves on {serving}, the port it would move to; set the annotation "
                   f"{ANNOTATION_VLLM_PORT} to a free port")  # fmt: skip
    if metrics in (serving, vllm_port):
        raise Skip(f"the sidecar's metrics port {metrics} is vLLM's port; choose another --metrics-port")
    for ci, port in _declared_ports(spec):
        if port.get("name") == METRICS_PORT_NAME:
            raise Skip(f"a container port is already named {METRICS_PORT_NAME}")
        taken = (vllm_port, metrics) if ci == server.container_index else (serving, vllm_port, metrics)
        if port.get("containerPort") in taken:
            raise Skip(f"port {port.get('containerPort')} is already declared in the pod")
    if any(isinstance(v, dict) and v.get("name") == TMP_VOLUME for v in spec.get("volumes") or []):
        raise Skip(f"a volume is already named {TMP_VOLUME}")

    if server.script is not None:
        script = server.argv[server.script_index]
        pieces = []
        pos = 0
        for index, new in sorted(edits.replace.items()):
            word = server.script.args[index]
            pieces += [script[pos : word.start], inject_shell.quote(new)]
            pos = word.end
        last = (server.script.args or server.script.all_words)[-1].end
        if last < pos:
            last = pos
        pieces.append(script[pos:last])
        if edits.append:
            pieces.append(" " + " ".join(inject_shell.quote(a) for a in edits.append))
        pieces.append(script[last:])
        new_argv = list(server.argv)
        new_argv[server.script_index] = "".join(pieces)
    else:
        new_argv = list(server.argv)
        for index, new in edits.replace.items():
            new_argv[server.start + index] = new
        new_argv += edits.append
    n_command = len(_strings(container.get("command")))
    new_command, new_args = new_argv[:n_command], new_argv[n_command:]
    if n_command and "args" not in container and new_args:  # the server is in command only: keep it there
        new_command, new_args = new_argv, []
    if new_command != (container.get("command") or []):
        rec.set(cpath, "command", new_command)
    if new_args != (container.get("args") or []):
        rec.set(cpath, "args", new_args)

    # the serving port moves to the sidecar, name and all
    ports = container.get("ports") or []
    moved = next((p for p in ports if isinstance(p, dict) and p.get("containerPort") == serving
                  and p.get("protocol", "TCP") == "TCP"), None)  # fmt: skip
    serving_names = {serving}
    if moved is not None:
        if "name" in moved:
            serving_names.add(moved["name"])
        rest = [p for p in ports if p is not moved]
        if rest:
            rec.set(cpath, "ports", rest)
        else:
            rec.delete(cpath, "ports")
        sidecar_port = copy.deepcopy(moved)
    else:
        sidecar_port = {"containerPort": serving, "protocol": "TCP"}

    # vLLM's own probes now ask vLLM on the loopback port, from inside its container
    python = "python3"
    if server.script is None and server.start >= 3 and re.fullmatch(r"python[0-9.]*", os.path.basename(server.argv[server.start - 3])):
        python = server.argv[server.start - 3]
    for name in PROBES:
        probe = container.get(name)
        if not isinstance(probe, dict):
            continue
        handler = "httpGet" if "httpGet" in probe else "tcpSocket" if "tcpSocket" in probe else None
        if handler is None or probe[handler].get("port") not in serving_names or probe[handler].get("host"):
            continue
        if handler == "httpGet" and str(probe["httpGet"].get("scheme", "HTTP")).upper() != "HTTP":
            raise Skip(f"vLLM's {name} uses HTTPS")
        new_probe = {}
        for key, value in probe.items():
            new_probe["exec" if key == handler else key] = _probe_command(python, probe, vllm_port) if key == handler else value
        rec.set(cpath, name, new_probe)

    # the sidecar
    env = []
    for var in container.get("env") or []:
        if isinstance(var, dict) and var.get("name") == "VLLM_API_KEY":
            env.append({**{k: copy.deepcopy(v) for k, v in var.items()}, "name": "SPECDEC_UPSTREAM_API_KEY"})
    if not env and edits.api_key is not None:
        env.append({"name": "SPECDEC_UPSTREAM_API_KEY", "value": edits.api_key})
    sidecar: dict[str, Any] = {"name": SIDECAR_NAME, "image": opts.image, "imagePullPolicy": opts.image_pull_policy}
    native = opts.native and template.native
    if native:
        sidecar["restartPolicy"] = "Always"
    sidecar["args"] = [
        "serve",
        f"--upstream=http://{LOOPBACK}:{vllm_port}",
        "--proxy-host=0.0.0.0",
        f"--proxy-port={serving}",
        "--metrics-host=0.0.0.0",
        f"--metrics-port={metrics}",
        *extra,
    ]
    if env:
        sidecar["env"] = env
    sidecar["ports"] = [sidecar_port, {"name": METRICS_PORT_NAME, "containerPort": metrics, "protocol": "TCP"}]
    probe_timing = {"periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 3}
    sidecar["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": METRICS_PORT_NAME}, **probe_timing}
    # ready once its last poll of vLLM succeeded: the pod is ready only when vLLM is
    sidecar["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": METRICS_PORT_NAME}, **probe_timing}
    resources = {}
    if opts.requests:
        resources["requests"] = dict(opts.requests)
    if opts.limits:
        resources["limits"] = dict(opts.limits)
    if resources:
        sidecar["resources"] = resources
    sidecar["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    sidecar["volumeMounts"] = [{"name": TMP_VOLUME, "mountPath": "/tmp"}]
    rec.append(template.spec, "initContainers" if native else "containers", sidecar)
    rec.append(template.spec, "volumes", {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}})
    return True


# ---------------------------------------------------------------- objects and streams


@dataclass
class Report:
    warnings: list[str] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)


def _record_of(obj: dict) -> dict | None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("annotations"), dict):
        return None
    text = meta["annotations"].get(ANNOTATION_RECORD)
    if text is None:
        return None
    try:
        record = json.loads(text)
        assert isinstance(record, dict) and isinstance(record.get("ops"), list)
    except (ValueError, AssertionError):
        raise InjectError(f"{_describe(obj)}: annotation {ANNOTATION_RECORD} is not what inject writes") from None
    return record


def take_out(obj: dict) -> bool:
    """Undo a recorded injection in place; False when *obj* carries none."""
    record = _record_of(obj)
    if record is None:
        return False
    annotations = obj["metadata"]["annotations"]
    del annotations[ANNOTATION_RECORD]
    restore(obj, record["ops"])
    return True


def _opted_out(obj: dict) -> bool:
    for t in templates(obj) or [Template([], None, True)]:
        value = _annotations(obj, t).get(ANNOTATION_INJECT)
        if value is not None and value.strip().lower() in ("false", "no", "off", "0", "disabled"):
            return True
    return False


def process_object(obj: dict, opts: Options, report: Report) -> None:
    had_record = take_out(obj)
    if opts.uninject:
        if not had_record:
            for t in templates(obj):
                spec = _get(obj, t.spec)
                every = (spec.get("initContainers") or []) + spec.get("containers", [])
                if any(isinstance(c, dict) and c.get("name") == SIDECAR_NAME for c in every):
                    report.warnings.append(f"{_describe(obj)}: has a {SIDECAR_NAME} container that inject did "
                                           f"not add (no {ANNOTATION_RECORD} annotation); left as it is")  # fmt: skip
                    break
        return
    if _opted_out(obj):
        return
    found = templates(obj)
    if not found:
        return
    if not isinstance(obj.get("metadata"), dict):
        report.warnings.append(f"{_describe(obj)}: no metadata; left as it is")
        return
    work = copy.deepcopy(obj)
    rec = Recorder(work)
    if not isinstance(work["metadata"].get("annotations"), dict):
        rec.set(["metadata"], "annotations", {})
    injected = False
    try:
        for t in found:
            annotations = _annotations(obj, t)
            injected |= inject_template(work, t, rec, opts, annotations)
    except Skip as why:
        report.warnings.append(f"{_describe(obj)}: {why}; left as it is")
        return
    if not injected:
        return
    work["metadata"]["annotations"][ANNOTATION_RECORD] = json.dumps({"version": 1, "ops": rec.ops},
                                                                    separators=(",", ":"))  # fmt: skip
    obj.clear()
    obj.update(work)
    report.injected.append(_describe(obj))


def _runtime_key(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def _kserve_model_args(objects: list[dict], opts: Options, report: Report) -> None:
    """An InferenceService whose predictor.model runs on an injected vLLM ServingRuntime and configures
    speculation in its own args gets the per-request metrics flag there (KServe appends those args to the
    runtime's container)."""
    runtimes = {}
    for obj in objects:
        if obj.get("kind") in KSERVE_RUNTIMES and _record_of(obj) is not None:
            spec = obj["spec"]
            args = [a for c in spec["containers"] if isinstance(c, dict) for a in (_strings(c.get("args")) or [])
                    + (_strings(c.get("command")) or [])]  # fmt: skip
            kind, ns, name = _runtime_key(obj)
            runtimes[(kind, ns if kind == "ServingRuntime" else "", name)] = "--per-request-spec-decode-metrics" in {
                _flag(a) for a in args}  # fmt: skip
    for obj in objects:
        if obj.get("kind") != "InferenceService" or not str(obj.get("apiVersion", "")).startswith("serving.kserve.io/"):
            continue
        model = ((obj.get("spec") or {}).get("predictor") or {}).get("model")
        if not isinstance(model, dict) or not isinstance(model.get("runtime"), str) or _opted_out(obj):
            continue
        ns = (obj.get("metadata") or {}).get("namespace", "")
        has_flag = runtimes.get(("ServingRuntime", ns, model["runtime"]))
        if has_flag is None:
            has_flag = runtimes.get(("ClusterServingRuntime", "", model["runtime"]))
        args = _strings(model.get("args"))
        if has_flag is not False or args is None:
            continue
        flags = {_flag(a) for a in args} | ({"--speculative-config"} if "-sc" in args else set())
        if not flags & {"--speculative-config", "--spec-method", "--spec-model", "--spec-tokens"}:
            continue
        if "--per-request-spec-decode-metrics" in flags:
            continue
        rec = Recorder(obj)
        if not isinstance(obj["metadata"].get("annotations"), dict):
            rec.set(["metadata"], "annotations", {})
        rec.set(["spec", "predictor", "model"], "args", [*args, "--per-request-spec-decode-metrics", "summary"])
        obj["metadata"]["annotations"][ANNOTATION_RECORD] = json.dumps({"version": 1, "ops": rec.ops},
                                                                       separators=(",", ":"))  # fmt: skip
        report.injected.append(_describe(obj))


def _objects(node: Any) -> list[dict]:
    """The Kubernetes objects in one document: the document itself, or the items of a List (any kind
    ending in List, kustomize's ResourceList too), recursively."""
    if not isinstance(node, dict):
        return []
    items = node.get("items")
    if str(node.get("kind", "")).endswith("List") and isinstance(items, list):
        return [obj for item in items for obj in _objects(item)]
    return [node] if "kind" in node else []


def transform(text: str, opts: Options, source: str = "<stdin>", report: Report | None = None) -> str:
    """The whole of one input: parsed first (bad YAML raises before anything is written), objects
    injected or taken out, documents that did not change written back as they were."""
    report = report if report is not None else Report()
    docs = parse_stream(text, source)
    before = [copy.deepcopy(d.obj) for d in docs]
    every = [obj for d in docs for obj in _objects(d.obj)]
    for obj in every:
        process_object(obj, opts, report)
    if not opts.uninject:
        _kserve_model_args(every, opts, report)
    changed = [d.obj != b for d, b in zip(docs, before, strict=True)]
    return render_stream(text, docs, changed)


# ---------------------------------------------------------------- command line


class InjectSettings(BaseModel):
    """Everything ``inject`` can be told; each field is the flag of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    filename: list[str] = Field(
        default_factory=lambda: ["-"],
        description="manifest files, comma separated; - = stdin (the default, as a Helm post-renderer reads it)",
        json_schema_extra={"metavar": "FILES"})
    uninject: bool = Field(False, description="take out what inject added, giving back the original objects")
    image: str = Field(Options.image, min_length=1, description="the sidecar's image")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="the sidecar's imagePullPolicy")
    vllm_port: int = Field(8001, ge=1, le=65535, description=(
        "loopback port vLLM moves to; the sidecar takes vLLM's port (annotation specdec.io/vllm-port overrides)"))
    metrics_port: int = Field(9464, ge=1, le=65535,
                              description="port of the sidecar's /metrics, /healthz, /readyz (container port specdec-metrics)")
    sidecar_args: str = Field("", description=(
        "extra `specdec-sidecar serve` flags for every sidecar, e.g. '--scrape-interval=5s --min-drafts=50' "
        "(annotation specdec.io/sidecar-args adds more per workload)"), json_schema_extra={"metavar": "FLAGS"})
    no_native_sidecar: bool = Field(False, description=(
        "an ordinary second container instead of a native sidecar (init container with restartPolicy: Always, "
        "Kubernetes 1.29+), for older clusters"))
    requests: str = Field("cpu=50m,memory=64Mi", description="the sidecar's resource requests, name=quantity,...")
    limits: str = Field("memory=256Mi", description="the sidecar's resource limits, name=quantity,...")

    @field_validator("filename", mode="before")
    @classmethod
    def _files(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or ["-"]
        return value

    @field_validator("sidecar_args")
    @classmethod
    def _sidecar_args(cls, value: str) -> str:
        try:
            check_sidecar_args(shlex.split(value), "the sidecar flags")
        except (ValueError, InjectError) as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("requests", "limits")
    @classmethod
    def _resources(cls, value: str) -> str:
        try:
            _quantities(value, "resources")
        except InjectError as error:
            raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _ports_differ(self) -> InjectSettings:
        if self.vllm_port == self.metrics_port:
            raise ValueError("--vllm-port and --metrics-port must differ")
        return self

    def options(self) -> Options:
        return Options(
            image=self.image,
            image_pull_policy=self.image_pull_policy,
            vllm_port=self.vllm_port,
            metrics_port=self.metrics_port,
            sidecar_args=shlex.split(self.sidecar_args),
            native=not self.no_native_sidecar,
            requests=_quantities(self.requests, "--requests"),
            limits=_quantities(self.limits, "--limits"),
            uninject=self.uninject,
        )


PROG = "specdec-sidecar inject"


def run(settings: InjectSettings, stdin=None, stdout=None, stderr=None) -> ExitCode:
    """Read every input, transform it, then write: bad input anywhere = one line on stderr, exit 2, and
    nothing on stdout (a Helm post-renderer's output is applied as it is)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    opts = settings.options()
    report = Report()
    outputs = []
    try:
        for name in settings.filename:
            if name == "-":
                text, source = stdin.read(), "<stdin>"
            else:
                try:
                    with open(name, encoding="utf-8") as handle:
                        text = handle.read()
                except OSError as error:
                    raise InjectError(f"{name}: {error.strerror or error}") from None
                except UnicodeDecodeError:
                    raise InjectError(f"{name}: not UTF-8 text") from None
                source = name
            outputs.append(transform(text, opts, source, report))
    except InjectError as error:
        print(f"{PROG}: {error}", file=stderr)
        return ExitCode.BAD_SETTING
    for warning in report.warnings:
        print(f"{PROG}: warning: {warning}", file=stderr)
    text = ""
    for out in outputs:
        if text and not text.endswith("\n"):
            text += "\n"
        if text and out.strip() and not out.lstrip().startswith("---"):
            text += "---\n"
        text += out
    stdout.write(text)
    stdout.flush()
    return ExitCode.OK


DESCRIPTION = (
    "Reads manifests (--filename, or stdin) and writes them to stdout with specdec-sidecar added to every pod "
    "template whose container runs vLLM's OpenAI server. Port takeover: the sidecar listens on vLLM's port "
    "under its name, vLLM moves to 127.0.0.1:--vllm-port. Workload annotations: specdec.io/inject: \"false\", "
    "specdec.io/vllm-port, specdec.io/sidecar-args. As a Helm post-renderer: helm install ... "
    "--post-renderer specdec-sidecar --post-renderer-args inject"
)
