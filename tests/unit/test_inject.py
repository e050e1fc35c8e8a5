"""``specdec-sidecar inject`` on manifests in the shape of the deployments users run (tests/fixtures/inject/:
production-stack's engine, KServe ServingRuntime + InferenceService, an llm-d InferencePool, a LeaderWorkerSet;
deploy/kustomize's base): every path into vLLM ends at the sidecar, the results validate (Kubernetes 1.30's
schemas, strict; the KServe SDK's models for KServe's kinds), the sidecar's own parser takes its arguments,
injecting twice changes nothing and ``--uninject`` gives back the original objects, field order included.
vLLM's own parser on the rendered commands, helm and kubectl are in tests/live/test_inject_k8s.py."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path

import pytest
import yaml
from manifests import container, docs, owner_of

from sidecar.cli import _settings_from, build_parser, main
from sidecar.commands import inject
from sidecar.commands.inject_shell import ShellError, find_server, shell_script_index, tokenize

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "inject"
SHAPES = sorted(p.name for p in FIXTURES.glob("*.yaml")) + ["kustomize-base"]
KUBE_VERSION = "1.30.0"


def source(shape: str) -> str:
    if shape == "kustomize-base":
        return (ROOT / "deploy" / "kustomize" / "base" / "vllm.yaml").read_text()
    return (FIXTURES / shape).read_text()


def run_inject(text: str, *flags: str) -> tuple[int, str, str]:
    """The command as the CLI runs it (flags parsed by the real parser), on *text* as stdin."""
    parsed = build_parser().parse_args(["inject", *flags])
    from sidecar.config import settings_from

    settings = settings_from(parsed, inject.InjectSettings)
    out, err = io.StringIO(), io.StringIO()
    code = inject.run(settings, stdin=io.StringIO(text), stdout=out, stderr=err)
    return int(code), out.getvalue(), err.getvalue()


def injected(text: str, *flags: str) -> str:
    code, out, err = run_inject(text, *flags)
    assert code == 0, err
    return out


def ordered(obj) -> str:
    """A rendering that differs whenever values or the order of keys differ."""
    return json.dumps(obj, sort_keys=False)


def named(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def sidecar_settings(sidecar: dict):
    parsed = build_parser().parse_args(sidecar["args"])
    assert parsed.command == "serve"
    return _settings_from(parsed)


def vllm_flags(argv: list[str]) -> dict[str, str]:
    flags = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            flags[key] = value or (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "")
    return flags


def validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def validate_pod_spec(spec: dict) -> None:
    """The containers and volumes as a Pod's (a KServe spec carries its own fields beside them)."""
    pod = {k: spec[k] for k in ("initContainers", "containers", "volumes") if k in spec}
    validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod})


def check_the_sidecar_path(spec: dict, serving_port, vllm_container: str, *, native: bool = True) -> object:
    """Common to every shape: the serving port (by number and by name) is the sidecar's, vLLM binds
    127.0.0.1 on the port the sidecar's --upstream names, and the sidecar's arguments parse."""
    sidecar = container(spec, inject.SIDECAR_NAME)
    assert (sidecar.get("restartPolicy") == "Always") is native
    assert sidecar in (spec.get("initContainers") or []) if native else sidecar in spec["containers"]
    assert owner_of(spec, serving_port) == inject.SIDECAR_NAME
    settings = sidecar_settings(sidecar)
    vllm = container(spec, vllm_container)
    argv = (vllm.get("command") or []) + (vllm.get("args") or [])
    script_at = shell_script_index(argv)
    if script_at is not None:
        argv = [w.value for w in find_server(argv[script_at]).args]
    flags = vllm_flags(argv)
    assert flags["--host"] == "127.0.0.1"
    assert settings.upstream == f"http://127.0.0.1:{flags['--port']}"
    assert settings.proxy_port == sidecar["ports"][0]["containerPort"]
    assert settings.metrics_port == 9464 and sidecar["ports"][1]["name"] == "specdec-metrics"
    assert "--enable-force-include-usage" in argv
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in vllm:  # vLLM's own probes ask it on the loopback port, from inside its container
            assert "exec" in vllm[probe], vllm[probe]
            assert f"127.0.0.1', {flags['--port']})" in vllm[probe]["exec"]["command"][2] or (
                f"http://127.0.0.1:{flags['--port']}/" in vllm[probe]["exec"]["command"][2])
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "specdec-metrics"}
    validate_pod_spec(spec)
    return settings


# ---------------------------------------------------------------- the shapes


def test_production_stack_engine_and_router_reach_the_sidecar():
    text = source("production-stack-engine.yaml")
    before, after = docs(text), docs(injected(text))
    engine = named(after, "Deployment", "vllm-llama3-deployment-vllm")
    spec = engine["spec"]["template"]["spec"]
    check_the_sidecar_path(spec, 8000, "vllm")
    # the engine Service targets the port by name, the router dials pod-IP:8000: both are the sidecar's
    service = named(after, "Service", "vllm-llama3-engine-service")
    assert owner_of(spec, service["spec"]["ports"][0]["targetPort"]) == inject.SIDECAR_NAME
    router_args = named(after, "Deployment", "vllm-deployment-router")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert owner_of(spec, int(router_args[router_args.index("--k8s-port") + 1])) == inject.SIDECAR_NAME
    assert router_args[router_args.index("--k8s-service-discovery-type") + 1] == "pod-ip"
    # vLLM stays in command: only, its other ports and flags kept; speculation -> the per-request flag
    vllm = container(spec, "vllm")
    old = container(named(before, "Deployment", "vllm-llama3-deployment-vllm")["spec"]["template"]["spec"], "vllm")
    assert "args" not in vllm and vllm["command"][:7] == [*old["command"][:4], "127.0.0.1", "--port", "8001"]
    assert vllm["command"][7:11] == old["command"][7:]
    assert vllm["command"][11:] == ["--per-request-spec-decode-metrics", "summary", "--enable-force-include-usage"]
    assert [p["name"] for p in vllm["ports"]] == ["zmq-port", "ucx-port"]
    assert vllm["startupProbe"]["failureThreshold"] == 60 and vllm["readinessProbe"]["periodSeconds"] == 5
    # the sidecar reads vLLM's API key from the same Secret
    sidecar = container(spec, inject.SIDECAR_NAME)
    assert sidecar["env"] == [{"name": "SPECDEC_UPSTREAM_API_KEY",
                               "valueFrom": {"secretKeyRef": {"name": "vllm-secrets", "key": "vllmApiKey"}}}]
    assert sidecar["ports"][0] == {"name": "container-port", "containerPort": 8000}
    # the Service and the router pass through unchanged
    for kind, name in (("Service", "vllm-llama3-engine-service"), ("Deployment", "vllm-deployment-router")):
        assert named(after, kind, name) == named(before, kind, name)
    for obj in after:
        validate_core(obj)


def kserve_check(obj: dict) -> list[str]:
    """*obj* against the KServe SDK's models (and the Kubernetes client's, for the pod parts): every key
    must be a field of the model, every value of the field's type."""
    import kserve.models
    import kubernetes.client.models

    errors: list[str] = []
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "ResourceQuantity": (str, int, float),
               "datetime": str, "bytes": str}

    def walk(value, type_name: str, path: str) -> None:
        if type_name[:5].lower() == "list[":
            if not isinstance(value, list):
                errors.append(f"{path}: not a list")
                return
            for i, item in enumerate(value):
                walk(item, type_name[5:-1], f"{path}[{i}]")
        elif type_name.startswith(("dict(", "Dict[")):
            if not isinstance(value, dict):
                errors.append(f"{path}: not a mapping")
                return
            inner = type_name[5:-1].split(", ", 1)[1]
            for key, item in value.items():
                walk(item, inner, f"{path}.{key}")
        elif type_name in scalars:
            if not isinstance(value, scalars[type_name]) or (type_name == "int" and isinstance(value, bool)):
                errors.append(f"{path}: {value!r} is not {type_name}")
        elif type_name == "object":
            return
        else:
            model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
            if not isinstance(value, dict):
                errors.append(f"{path}: not a mapping ({type_name})")
                return
            by_key = {key: attr for attr, key in model.attribute_map.items()}
            for key, item in value.items():
                if key not in by_key:
                    errors.append(f"{path}.{key}: not a field of {type_name}")
                else:
                    walk(item, model.openapi_types[by_key[key]], f"{path}.{key}")

    model = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}[obj["kind"]]
    walk(obj, model, obj["kind"])
    return errors


def test_kserve_serving_runtime_and_inference_services():
    pytest.importorskip("kserve", reason="the kserve SDK (test extras) is not installed")
    text = source("kserve-vllm.yaml")
    before, after = docs(text), docs(injected(text))
    runtime = named(after, "ServingRuntime", "vllm-openai")
    spec = runtime["spec"]
    # a ServingRuntime has no init containers: the sidecar is an ordinary container, and the one with the port
    check_the_sidecar_path(spec, 8080, "kserve-container", native=False)
    assert [c["name"] for c in spec["containers"]] == ["kserve-container", inject.SIDECAR_NAME]
    assert "ports" not in container(spec, "kserve-container")
    assert container(spec, "kserve-container")["args"][:3] == ["--port=8001", "--model=/mnt/models",
                                                                "--served-model-name={{.Name}}"]
    # speculation is configured in the InferenceService's model args: the per-request flag goes there too
    isvc = named(after, "InferenceService", "llama3")
    assert isvc["spec"]["predictor"]["model"]["args"][-2:] == ["--per-request-spec-decode-metrics", "summary"]
    custom = named(after, "InferenceService", "qwen-custom")
    check_the_sidecar_path(custom["spec"]["predictor"], 8080, "kserve-container", native=False)
    for obj in after:
        assert not kserve_check(obj), kserve_check(obj)
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["containers"][1]["restartPolicyy"] = "Always"
    assert kserve_check(broken)  # the check can fail
    assert docs(injected(injected(text), "--uninject")) == before


def test_llm_d_inference_pool_targets_the_sidecar():
    text = source("llm-d-inferencepool.yaml")
    before, after = docs(text), docs(injected(text))
    pool = named(after, "InferencePool", "llama3-pool")
    assert pool == named(before, "InferencePool", "llama3-pool")
    deployment = named(after, "Deployment", "llama3-decode")
    spec = deployment["spec"]["template"]["spec"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    check_the_sidecar_path(spec, pool["spec"]["targetPorts"][0]["number"], "vllm")
    assert [c["name"] for c in spec["initContainers"]] == ["model-download", inject.SIDECAR_NAME]
    vllm = container(spec, "vllm")
    assert vllm["command"] == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert vllm["args"].count("--enable-force-include-usage") == 1  # already there: not added twice
    assert "--per-request-spec-decode-metrics" in vllm["args"]
    assert container(spec, inject.SIDECAR_NAME)["ports"][0]["name"] == "vllm"  # the name moved with the port
    validate_core(deployment)


def test_leaderworkerset_leader_script_is_rewritten_and_workers_left_alone():
    text = source("leaderworkerset.yaml")
    before, after = docs(text), docs(injected(text))
    lws = after[0]["spec"]["leaderWorkerTemplate"]
    spec = lws["leaderTemplate"]["spec"]
    check_the_sidecar_path(spec, 8080, "vllm-leader")
    script = container(spec, "vllm-leader")["command"][2]
    # the Ray start before the server is untouched, the server's own words changed in place
    assert script.startswith("bash /vllm-workspace/examples/online_serving/multi-node-serving.sh leader "
                             "--ray_cluster_size=$(LWS_GROUP_SIZE); python3 -m vllm.entrypoints.openai.api_server "
                             "--port 8001 --model")  # fmt: skip
    server = shlex.split(script.split(";", 1)[1])
    assert json.loads(server[server.index("--speculative-config") + 1])["method"] == "ngram"
    assert server[-5:] == ["--host", "127.0.0.1", "--per-request-spec-decode-metrics", "summary",
                           "--enable-force-include-usage"]
    assert lws["workerTemplate"] == before[0]["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    for template in ("leaderTemplate", "workerTemplate"):
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                       "template": lws[template]})  # fmt: skip


def test_plain_deployment_from_the_image_entrypoint():
    """deploy/kustomize's base: vLLM's image runs the server as its entrypoint, the Deployment gives args only."""
    text = source("kustomize-base")
    after = docs(injected(text))
    deployment = named(after, "Deployment", "vllm")
    spec = deployment["spec"]["template"]["spec"]
    check_the_sidecar_path(spec, "http", "vllm")
    assert "command" not in container(spec, "vllm")
    service = named(after, "Service", "vllm")
    assert owner_of(spec, service["spec"]["ports"][0]["targetPort"]) == inject.SIDECAR_NAME
    for obj in after:
        validate_core(obj)


# ---------------------------------------------------------------- the guarantees


@pytest.mark.parametrize("shape", SHAPES)
def test_injecting_twice_changes_nothing_and_uninject_gives_back_the_original(shape):
    text = source(shape)
    once = injected(text)
    assert once != text
    assert injected(once) == once
    back = injected(once, "--uninject")
    assert [ordered(d) for d in docs(back)] == [ordered(d) for d in docs(text)]
    assert injected(text, "--uninject") == text  # nothing to take out: byte for byte
    # a different setting re-injects from the original, not on top of the old injection
    other = docs(injected(once, "--vllm-port=8101"))
    assert docs(injected(text, "--vllm-port=8101")) == other


def test_untouched_documents_pass_through_byte_for_byte():
    plain = ("# a comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}   # trailing\n"
             "data:\n  when: 2024-01-01\n  flag: 'yes'\n---\napiVersion: apps/v1\nkind: Deployment\n"
             "metadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n"
             "        - {name: nginx, image: nginx, args: [serve]}\n...\n")  # fmt: skip
    assert injected(plain) == plain
    mixed = plain.replace("...\n", "---\n") + source("kustomize-base")
    out = injected(mixed)
    assert out.startswith(plain.replace("...\n", "---\n"))  # the untouched documents, comments and all
    assert len(docs(out)) == len(docs(mixed)) == 4


def test_list_objects_and_a_resource_list():
    deployment, service = docs(source("kustomize-base"))
    for kind in ("List", "ResourceList"):
        text = yaml.safe_dump({"apiVersion": "v1", "kind": kind, "items": [service, deployment]}, sort_keys=False)
        out = docs(injected(text))[0]
        assert out["items"][0] == service
        check_the_sidecar_path(out["items"][1]["spec"]["template"]["spec"], "http", "vllm")
        assert docs(injected(injected(text), "--uninject"))[0] == docs(text)[0]


def test_bad_yaml_is_one_line_and_nothing_written():
    for bad in ("apiVersion: v1\nkind: [unclosed\n", "a: 1\n b: 2\n", "key: 'open\n"):
        code, out, err = run_inject(source("kustomize-base") + "---\n" + bad)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "not valid YAML" in err and "<stdin>:" in err


def test_main_reports_bad_flags_in_one_line(capsys):
    assert main(["inject", "--vllm-port", "70000"]) == 2
    assert main(["inject", "--sidecar-args=--no-such-flag=1"]) == 2
    assert main(["inject", "--sidecar-args=--upstream=http://x"]) == 2
    assert main(["inject", "--filename", "/nonexistent/manifest.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "--vllm-port" in err[0] and "--no-such-flag" in err[1]
    assert "set by inject itself" in err[2] and "/nonexistent/manifest.yaml" in err[3]


def test_annotations_opt_out_and_override():
    deployment, service = docs(source("kustomize-base"))
    deployment["metadata"]["annotations"] = {"specdec.io/inject": "false"}
    text = yaml.safe_dump(deployment, sort_keys=False)
    assert injected(text) == text
    deployment["metadata"]["annotations"] = {"specdec.io/vllm-port": "8101",
                                             "specdec.io/sidecar-args": "--scrape-interval=2s --min-drafts 50"}
    out = docs(injected(yaml.safe_dump(deployment, sort_keys=False)))[0]
    settings = check_the_sidecar_path(out["spec"]["template"]["spec"], "http", "vllm")
    assert settings.upstream == "http://127.0.0.1:8101" and settings.min_drafts == 50
    # on the pod template too
    del deployment["metadata"]["annotations"]
    deployment["spec"]["template"]["metadata"]["annotations"] = {"specdec.io/inject": "false"}
    text = yaml.safe_dump(deployment, sort_keys=False)
    assert injected(text) == text
    deployment["spec"]["template"]["metadata"]["annotations"] = {"specdec.io/vllm-port": "80000"}
    code, out, err = run_inject(yaml.safe_dump(deployment))
    assert code == 2 and out == "" and "Deployment vllm: annotation specdec.io/vllm-port" in err


def test_what_cannot_be_rewritten_is_left_alone_with_a_warning():
    deployment, _ = docs(source("kustomize-base"))
    vllm = deployment["spec"]["template"]["spec"]["containers"][0]
    cases = {
        "port from a variable": ["sh", "-c", "exec vllm serve $MODEL --port $PORT"],
        "here-document": ["sh", "-c", "cat <<EOF > /tmp/x\nhi\nEOF\nvllm serve m --port 8000"],
        "two servers": ["bash", "-c", "vllm serve a --port 8000 & vllm serve b --port 8002"],
        "already on 8001": ["vllm", "serve", "m", "--port", "8001"],
        "unix socket": ["vllm", "serve", "m", "--uds", "/tmp/v.sock"],
    }
    for why, command in cases.items():
        vllm.pop("args", None)
        vllm["command"] = command
        text = yaml.safe_dump(deployment, sort_keys=False)
        code, out, err = run_inject(text)
        assert code == 0 and out == text, why
        assert err.startswith("specdec-sidecar inject: warning: Deployment vllm: ") and "left as it is" in err, why


def test_shell_scripts_are_rewritten_word_by_word():
    deployment, _ = docs(source("kustomize-base"))
    vllm = deployment["spec"]["template"]["spec"]["containers"][0]
    vllm.pop("args")
    vllm["command"] = ["/bin/bash", "-ec"]
    vllm["args"] = ['pip list | grep vllm\nexec env HF_HOME=/cache vllm serve "$MODEL" \\\n  --port="8000" '
                    '--speculative-config \'{"method": "ngram"}\' 2>&1 | tee /tmp/log # serve\necho done']
    out = docs(injected(yaml.safe_dump(deployment, sort_keys=False)))[0]
    spec = out["spec"]["template"]["spec"]
    script = container(spec, "vllm")["args"][0]
    assert script == ('pip list | grep vllm\nexec env HF_HOME=/cache vllm serve "$MODEL" \\\n  --port=8001 '
                      '--speculative-config \'{"method": "ngram"}\' --host 127.0.0.1 '
                      "--per-request-spec-decode-metrics summary --enable-force-include-usage 2>&1 | tee "
                      "/tmp/log # serve\necho done")  # fmt: skip
    check_the_sidecar_path(spec, "http", "vllm")
    # a script that does not start vLLM's server is not vLLM
    vllm["args"] = ["python3 -m http.server 8000"]
    text = yaml.safe_dump(deployment, sort_keys=False)
    assert injected(text) == text


def test_the_lexer_reads_quotes_expansions_and_separators():
    words = [t.value if not isinstance(t, str) else t for t in tokenize("a 'b c' \"d $X\" e\\ f;g && h # c\ni")]
    assert words == ["a", "b c", "d $X", "e f", ";", "g", "&&", "h", "\n", "i"]
    server = find_server("ray start --head; VLLM_X=1 python3.12 -m vllm.entrypoints.openai.api_server --port 9 >log")
    assert [w.value for w in server.args] == ["--port", "9"]
    assert find_server("echo vllm serve") is None
    for broken in ("vllm serve 'open", 'vllm serve "open', "vllm serve $(date"):
        with pytest.raises(ShellError):
            find_server(broken)


def test_native_or_ordinary_container_and_other_sidecars_left_alone():
    text = source("kustomize-base")
    spec = named(docs(injected(text, "--no-native-sidecar")), "Deployment", "vllm")["spec"]["template"]["spec"]
    check_the_sidecar_path(spec, "http", "vllm", native=False)
    assert "initContainers" not in spec
    # a pod that already has a specdec-sidecar (this project's chart) is not touched, nor taken out
    chart_like = injected(text).replace("specdec.io/injected", "example.com/other")
    assert injected(chart_like) == chart_like
    code, out, err = run_inject(chart_like, "--uninject")
    assert out == chart_like and "that inject did not add" in err


def test_settings_image_resources_and_sidecar_flags():
    out = docs(injected(source("kustomize-base"), "--image=registry.example.com/specdec-sidecar:9.9",
                        "--requests=cpu=100m,memory=128Mi", "--limits=memory=512Mi,cpu=1",
                        "--sidecar-args=--scrape-interval=2s --log-format console", "--metrics-port=9100",
                        "--image-pull-policy=Always"))  # fmt: skip
    spec = named(out, "Deployment", "vllm")["spec"]["template"]["spec"]
    sidecar = container(spec, inject.SIDECAR_NAME)
    assert sidecar["image"] == "registry.example.com/specdec-sidecar:9.9" and sidecar["imagePullPolicy"] == "Always"
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"memory": "512Mi", "cpu": "1"}}  # fmt: skip
    settings = sidecar_settings(sidecar)
    assert settings.scrape_interval == 2 and settings.log_format == "console" and settings.metrics_port == 9100
    assert sidecar["ports"][1]["containerPort"] == 9100
