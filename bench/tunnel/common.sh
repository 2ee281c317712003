# Shared by bench/tunnel.sh and bench/tunnel/rr-compare.sh (sourced): a gateway's config, the
# exported bench Service and the stunnel and haproxy chains' configs (free ports and the rest
# come from bench/common.sh). Uses the caller's $work (scratch dir), $C (certificates from
# `fedgate certs`), $SRV, $IPERF_PORT and $ECHO_PORT (the servers).

# shellcheck source=bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

gateway() { # id ip tunnel-port peer-id peer-ip peer-port vip-octet [maxUdpPayloadSize] [dataPlaneThreads] [busyPoll] [socketBufferSize]
  local d=$work/$1
  mkdir -p "$d/cluster"
  cat >"$d/gateway.yaml" <<YAML
cluster: { id: $1, clusterset: bench, locality: { region: r-$1, zone: z-$1 } }
discovery: { source: file, file: { dir: ./cluster }, peerLeaseDuration: 15s }
peers: [ { id: $4, address: "$5:$6" } ]
tls: { cert: $C/$1.crt, key: $C/$1.key, ca: $C/ca.crt }
tunnel: { listen: "$2:$3"${8:+, maxUdpPayloadSize: $8}${11:+, socketBufferSize: ${11}} }
dns: { listen: "$2:$(free_udp)", upstream: [ "127.0.0.1:9" ], ttl: 5s }
front: { mode: vip, clusterSetIPRange: 127.2.$7.0/24 }
admin: { listen: "$2:$(free_tcp)" }
traffic: { healthCheck: { interval: 5s, timeout: 1s, unhealthyThreshold: 2, healthyThreshold: 1 }${9:+, dataPlaneThreads: $9}${10:+, busyPoll: ${10}} }
YAML
}

# bench_export DIR: the bench/bench Service (iperf and echo ports), its EndpointSlice (the
# servers at $SRV) and its ServiceExport, into the gateway directory DIR.
bench_export() {
  cat >"$1/cluster/bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: { name: bench, namespace: bench }
spec:
  type: ClusterIP
  ports:
  - { name: iperf, port: $IPERF_PORT, protocol: TCP }
  - { name: echo, port: $ECHO_PORT, protocol: TCP }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: bench-b, namespace: bench, labels: { kubernetes.io/service-name: bench } }
addressType: IPv4
ports:
- { name: iperf, port: $IPERF_PORT, protocol: TCP }
- { name: echo, port: $ECHO_PORT, protocol: TCP }
endpoints:
- { addresses: ["$SRV"], conditions: { ready: true } }
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: { name: bench, namespace: bench }
YAML
}

# wait_tcp HOST PORT WHAT: waits up to 15 s until HOST:PORT accepts a TCP connection, else exits.
wait_tcp() {
  for _ in $(seq 1 150); do
    python3 -c "import socket,sys; socket.create_connection(('$1',$2),timeout=0.5).close()" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$3 did not come up on $1:$2" >&2
  exit 1
}

# stunnel_service NAME client|server ACCEPT CONNECT CERT-NAME: one service section of an
# stunnel4 config: mutual TLS with $C/CERT-NAME.{crt,key}, peers verified against $C/ca.crt.
stunnel_service() {
  echo "[$1]"
  [[ $2 == client ]] && echo "client = yes"
  printf 'accept = %s\nconnect = %s\ncert = %s\nkey = %s\nCAfile = %s\nverifyChain = yes\n' \
    "$3" "$4" "$C/$5.crt" "$C/$5.key" "$C/ca.crt"
  [[ $2 == server ]] && echo "requireCert = yes"
  return 0
}

# stunnel_configs: the two-hop stunnel4 chain's configs, $work/stunnel-client.conf (plain TCP
# on $S1, TLS with certificate a to $S2) and $work/stunnel-server.conf (TLS on $S2 with client
# certificates required, plain TCP to the servers at $SRV), for the iperf and echo ports
# ($SI1/$SI2, $SE1/$SE2).
stunnel_configs() {
  {
    printf 'foreground = yes\npid =\n'
    stunnel_service iperf client "$S1:$SI1" "$S2:$SI2" a
    stunnel_service echo client "$S1:$SE1" "$S2:$SE2" a
  } >"$work/stunnel-client.conf"
  {
    printf 'foreground = yes\npid =\n'
    stunnel_service iperf server "$S2:$SI2" "$SRV:$IPERF_PORT" b
    stunnel_service echo server "$S2:$SE2" "$SRV:$ECHO_PORT" b
  } >"$work/stunnel-server.conf"
}

# haproxy_configs: the two-hop haproxy chain's configs, $work/haproxy-client.cfg (plain TCP on
# $H1, TLS with client certificate a to $H2) and $work/haproxy-server.cfg (TLS on $H2 with
# client certificates verified, plain TCP to the servers at $SRV), for the iperf and echo
# ports ($HI1/$HI2, $HE1/$HE2).
haproxy_configs() {
  local defaults='global
  maxconn 1000
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s'
  # HAPROXY_GLOBAL: one more global line (e.g. busy-polling), for rr-compare.sh experiments.
  [[ -z ${HAPROXY_GLOBAL:-} ]] || defaults=${defaults/maxconn 1000/maxconn 1000$'\n'  $HAPROXY_GLOBAL}
  cat >"$work/haproxy-client.cfg" <<CONF
$defaults
listen iperf
  bind $H1:$HI1
  server s $H2:$HI2 ssl crt $C/a.pem ca-file $C/ca.crt verify required
listen echo
  bind $H1:$HE1
  server s $H2:$HE2 ssl crt $C/a.pem ca-file $C/ca.crt verify required
CONF
  cat >"$work/haproxy-server.cfg" <<CONF
$defaults
listen iperf
  bind $H2:$HI2 ssl crt $C/b.pem ca-file $C/ca.crt verify required
  server s $SRV:$IPERF_PORT
listen echo
  bind $H2:$HE2 ssl crt $C/b.pem ca-file $C/ca.crt verify required
  server s $SRV:$ECHO_PORT
CONF
}
