#!/usr/bin/env bash
# Starts three clusters on this machine (one server each: eu-west, us-east,
# edge-1) with gossip, mutual TLS and the policies in ../policies, and for
# each a real agent (agent-CLUSTER.toml, class agent-host) beside simulated
# nodes. Run from anywhere; state goes to $WORK
# (default /tmp/hanse-federation), the clusters' management token to
# $WORK/token. Stop with: kill $(cat $WORK/pids)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
hanse=${HANSE_BIN:-$repo/target/release/hanse}
work=${WORK:-/tmp/hanse-federation}
[ -x "$hanse" ] || { echo "build first: cargo build --release (or set HANSE_BIN)" >&2; exit 1; }
rm -rf "$work" && mkdir -p "$work/policies" && cp "$here"/*.toml "$work"/
cp "$repo"/examples/policies/*.toml "$work/policies/"
cd "$work"
"$hanse" tls ca create --dir pki > /dev/null
"$hanse" federation keygen --out federation.key 2> /dev/null
: > pids
for c in eu-west us-east edge-1; do
  # The jurisdictions its [gossip] claims: peers refuse a summary claiming
  # one its certificate does not allow.
  case $c in us-east) j=us ;; *) j=eu ;; esac
  "$hanse" tls cert create --cluster $c --role server --name s1 --jurisdiction $j --ca-dir pki --out-dir pki > /dev/null
  "$hanse" server --config $c.toml > $c.log 2>&1 &
  echo $! >> pids
done
sleep 3
port() { case $1 in eu-west) echo 4661;; us-east) echo 4662;; edge-1) echo 4663;; esac; }
# One management secret for the three clusters' ACLs (each bootstraps
# with it once), kept where only this user reads it.
(umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > token)
export HANSE_TOKEN=$(cat token) HANSE_CACERT=$work/pki/ca.pem
for c in eu-west us-east edge-1; do
  "$hanse" --address 127.0.0.1:$(port $c) acl bootstrap --secret-file token > /dev/null
done
for c in eu-west us-east edge-1; do
  "$hanse" --address 127.0.0.1:$(port $c) node simulate --fleet fleet-$c.toml > nodes-$c.log 2>&1 &
  echo $! >> pids
  "$hanse" tls cert create --cluster $c --role agent --name host-$c --ca-dir pki --out-dir pki > /dev/null
  "$hanse" agent --config agent-$c.toml > agent-$c.log 2>&1 &
  echo $! >> pids
done
sleep 2
echo "three clusters up; state and logs in $work"
for c in eu-west us-east edge-1; do echo "  $c: HANSE_ADDR=127.0.0.1:$(port $c)"; done
echo "  every cluster's management token: export HANSE_TOKEN=\$(cat $work/token)"
echo "  the CA of their HTTPS APIs:        export HANSE_CACERT=$work/pki/ca.pem"
echo "stop: kill \$(cat $work/pids)"
