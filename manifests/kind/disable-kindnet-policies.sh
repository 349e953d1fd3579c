#!/usr/bin/env bash
# Switches off kindnetd's built-in network-policy engine (flag --network-policy=false) so that
# kube-netpol-iptables is the only one enforcing policies. Idempotent.
set -euo pipefail
ctx=${1:-kind-kind}
ds="kubectl --context $ctx -n kube-system get daemonset kindnet"
if $ds -o jsonpath='{.spec.template.spec.containers[0].args}{.spec.template.spec.containers[0].command}' | grep -q -- '--network-policy=false'; then
  echo "kindnet's network-policy engine is already off"; exit 0
fi
# kindnet's container may list its flags in args or in command; append where they are.
field=args
[ -z "$($ds -o jsonpath='{.spec.template.spec.containers[0].args}')" ] && field=command
kubectl --context "$ctx" -n kube-system patch daemonset kindnet --type=json \
  -p "[{\"op\":\"add\",\"path\":\"/spec/template/spec/containers/0/$field/-\",\"value\":\"--network-policy=false\"}]"
kubectl --context "$ctx" -n kube-system rollout status daemonset kindnet --timeout=120s
