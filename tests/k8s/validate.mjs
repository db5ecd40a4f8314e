// Validate Kubernetes manifests against their API schemas, offline.
//
// Usage: node tests/k8s/validate.mjs [--dump] FILE.yaml...
// Each YAML document is checked by the kubernetes-models validator of its apiVersion and kind
// (generated from the Kubernetes OpenAPI spec and from KEDA's API types); a kind without one
// is an error. Prints one line per problem and exits 1 if any; with --dump, prints the parsed
// documents as one JSON array on success (for the Python tests to inspect).
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { Service } from "kubernetes-models/v1/Service";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const MODELS = {
  "apps/v1 Deployment": Deployment,
  "v1 Service": Service,
  "keda.sh/v1alpha1 ScaledObject": ScaledObject,
  "keda.sh/v1alpha1 TriggerAuthentication": TriggerAuthentication,
};

const args = process.argv.slice(2);
const dump = args[0] === "--dump";
const files = dump ? args.slice(1) : args;
if (files.length === 0) {
  console.error("usage: node tests/k8s/validate.mjs [--dump] FILE.yaml...");
  process.exit(2);
}
const problems = [];
const documents = [];
for (const file of files) {
  for (const [i, doc] of parseAllDocuments(readFileSync(file, "utf8")).entries()) {
    const where = `${file} document ${i + 1}`;
    if (doc.errors.length > 0) {
      problems.push(`${where}: not valid YAML: ${doc.errors[0].message}`);
      continue;
    }
    const data = doc.toJS();
    if (data === null) continue;
    const kind = `${data.apiVersion} ${data.kind}`;
    const Model = MODELS[kind];
    if (Model === undefined) {
      problems.push(`${where}: no schema for ${kind}; add its model to tests/k8s/validate.mjs`);
      continue;
    }
    try {
      new Model(data).validate();
      documents.push({ file, ...data });
    } catch (e) {
      problems.push(`${where} (${kind} ${data.metadata?.name}): ${e.message}`);
    }
  }
}
for (const p of problems) console.error(p);
if (problems.length > 0) process.exit(1);
if (dump) console.log(JSON.stringify(documents));
