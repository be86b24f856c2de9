// Checks resources of CRD kinds against their CRD schemas: the @kubernetes-models packages
// (validators generated from the upstream CRDs and API types: Istio 1.2x, Gateway API v1,
// CloudNativePG's postgresql.cnpg.io/v1, prometheus-operator's monitoring.coreos.com/v1),
// vendored as tarballs in vendor/; their small runtime comes from npm, pinned by
// package-lock.json. Core Kubernetes kinds are checked by kubernetes-validate instead.
//
//   npm ci --prefix deploy/validate && node deploy/validate/validate.mjs deploy/istio/*.yaml
//
// Prints one line per resource; exits 1 if any resource is invalid or of an unknown kind.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const packages = {
  "extensions.istio.io": "@kubernetes-models/istio",
  "networking.istio.io": "@kubernetes-models/istio",
  "security.istio.io": "@kubernetes-models/istio",
  "telemetry.istio.io": "@kubernetes-models/istio",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "postgresql.cnpg.io": "@kubernetes-models/cloudnative-pg",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

let failed = 0;
for (const file of process.argv.slice(2)) {
  const docs = parseAllDocuments(readFileSync(file, "utf8"));
  for (const doc of docs) {
    if (doc.errors.length > 0) {
      console.log(`${file}: YAML error: ${doc.errors[0].message}`);
      failed++;
      continue;
    }
    const resource = doc.toJS();
    if (resource === null) continue;
    const where = `${file}: ${resource.kind ?? "?"}/${resource.metadata?.name ?? "?"}`;
    const [group, version] = String(resource.apiVersion ?? "").split("/");
    const pkg = packages[group];
    if (!pkg || !version || !resource.kind) {
      console.log(`${where}: no CRD schema for apiVersion ${resource.apiVersion}`);
      failed++;
      continue;
    }
    let Model;
    try {
      Model = (await import(`${pkg}/${group}/${version}/${resource.kind}`))[resource.kind];
    } catch {
      Model = undefined;
    }
    if (!Model) {
      console.log(`${where}: ${group}/${version} has no kind ${resource.kind}`);
      failed++;
      continue;
    }
    try {
      new Model(resource).validate();
      console.log(`${where}: valid`);
    } catch (e) {
      console.log(`${where}: INVALID: ${e.message}`);
      failed++;
    }
  }
}
process.exit(failed > 0 ? 1 : 0);
