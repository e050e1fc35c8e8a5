// Validates Prometheus Operator objects (JSON array on stdin) with @kubernetes-models/prometheus-operator,
// whose validators are generated from the operator's CRD openAPIV3Schema. Prints one JSON line:
// [{kind, name, ok, error}]. Used by tests/test_helm.py; NODE_PATH points at the npm prefix of make k8s-tools.
import { pathToFileURL } from "node:url";
import path from "node:path";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const root = path.join(process.env.SPECDEC_NPM_PREFIX, "node_modules", "@kubernetes-models", "prometheus-operator");
const results = [];
for (const obj of objects) {
  const version = obj.apiVersion.split("/")[1];
  const file = path.join(root, "monitoring.coreos.com", version, `${obj.kind}.js`);
  const mod = await import(pathToFileURL(file).href);
  try {
    new mod[obj.kind](obj).validate();
    results.push({ kind: obj.kind, name: obj.metadata?.name, ok: true });
  } catch (error) {
    results.push({ kind: obj.kind, name: obj.metadata?.name, ok: false, error: String(error.message ?? error).slice(0, 800) });
  }
}
console.log(JSON.stringify(results));
