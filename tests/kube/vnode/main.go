// fedgate-vnode: a virtual-kubelet node for the fedgate e2e test clusters whose pods are host
// processes in network namespaces (docs/testing-kube.md, "Pods").
//
// Run inside the cluster's network namespace (`nsenter --net=/run/netns/<cluster> --`, so that
// `ip netns add` still works on the host's mount namespace). At start it creates a Linux bridge
// holding the first address of --pod-cidr (the pods' default gateway, the node's InternalIP and
// the address the kubelet API listens on), then registers the node with the apiserver and runs
// virtual-kubelet's node and pod controllers with the provider in provider.go.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/log"
	vkslog "github.com/virtual-kubelet/virtual-kubelet/log/slog"
	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

type config struct {
	kubeconfig, nodeName, podCIDR, bridge, dns, netnsPrefix, stateDir string
	tlsCert, tlsKey, clientCA, clusterDomain                          string
	port                                                              int
}

func main() {
	var c config
	flag.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (admin)")
	flag.StringVar(&c.nodeName, "node-name", "vnode", "name of the Node object")
	flag.StringVar(&c.podCIDR, "pod-cidr", "10.244.0.0/24", "the node's pod range; its first address goes on the bridge")
	flag.StringVar(&c.bridge, "bridge", "fgpods0", "name of the pods' bridge (created if absent)")
	flag.StringVar(&c.dns, "dns", "", "nameserver for the pods' resolv.conf (default: the bridge address)")
	flag.StringVar(&c.netnsPrefix, "netns-prefix", "fgpod-", "prefix of the pods' network namespace names")
	flag.StringVar(&c.stateDir, "state-dir", "/tmp/fedgate-vnode", "directory for the containers' logs")
	flag.StringVar(&c.tlsCert, "tls-cert", "", "kubelet API serving certificate (PEM)")
	flag.StringVar(&c.tlsKey, "tls-key", "", "kubelet API serving key (PEM)")
	flag.StringVar(&c.clientCA, "client-ca", "", "CA whose client certificates may use the kubelet API")
	flag.StringVar(&c.clusterDomain, "cluster-domain", "cluster.local", "the cluster's DNS domain")
	flag.IntVar(&c.port, "port", 10250, "kubelet API port (on the bridge address)")
	debug := flag.Bool("debug", false, "log at debug level")
	flag.Parse()
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log.L = vkslog.FromSlog(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
	if err := run(c); err != nil {
		fmt.Fprintf(os.Stderr, "fedgate-vnode: %v\n", err)
		os.Exit(1)
	}
}

func run(c config) error {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	// nodeutil.NewNode makes a default client from $KUBECONFIG before our option replaces it.
	_ = os.Setenv("KUBECONFIG", c.kubeconfig)
	nw, err := newPodNet(c.podCIDR, c.bridge, c.netnsPrefix)
	if err != nil {
		return err
	}
	if err := nw.setupBridge(); err != nil {
		return err
	}
	dns := nw.gateway
	if c.dns != "" {
		if dns = net.ParseIP(c.dns).To4(); dns == nil {
			return fmt.Errorf("--dns %q is not an IPv4 address", c.dns)
		}
	}
	nw.reserve(dns)
	if err := os.MkdirAll(c.stateDir, 0o755); err != nil {
		return err
	}
	client, err := nodeutil.ClientsetFromEnv(c.kubeconfig)
	if err != nil {
		return err
	}
	p := &provider{
		net: nw, dns: dns.String(), stateDir: c.stateDir, nodeName: c.nodeName,
		clusterDomain: c.clusterDomain, client: client, pods: map[string]*podState{},
		notify: func(*corev1.Pod) {}, dirty: map[string]bool{}, kick: make(chan struct{}, 1),
	}
	go p.notifier(ctx)

	mux := http.NewServeMux()
	newProvider := func(pc nodeutil.ProviderConfig) (nodeutil.Provider, node.NodeProvider, error) {
		p.configMaps, p.secrets = pc.ConfigMaps, pc.Secrets
		n := pc.Node
		list := corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("16"),
			corev1.ResourceMemory: resource.MustParse("64Gi"),
			corev1.ResourcePods:   resource.MustParse("250"),
		}
		n.Status.Capacity, n.Status.Allocatable = list, list
		n.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: nw.gateway.String()},
			{Type: corev1.NodeHostName, Address: c.nodeName},
		}
		n.Status.DaemonEndpoints.KubeletEndpoint.Port = int32(c.port)
		n.Status.NodeInfo.OperatingSystem = "linux"
		n.Status.NodeInfo.Architecture = "amd64"
		n.Status.NodeInfo.KubeletVersion = "v1.37.2-fedgate-vnode"
		n.Labels["kubernetes.io/os"] = "linux"
		n.Spec.PodCIDR = nw.cidr.String()
		n.Spec.PodCIDRs = []string{nw.cidr.String()}
		return p, nil, nil
	}
	vn, err := nodeutil.NewNode(c.nodeName, newProvider,
		func(cfg *nodeutil.NodeConfig) error {
			cfg.KubeconfigPath = c.kubeconfig
			cfg.Client = nil
			cfg.Handler = mux
			cfg.HTTPListenAddr = net.JoinHostPort(nw.gateway.String(), fmt.Sprint(c.port))
			cfg.NumWorkers = 4
			cfg.InformerResyncPeriod = time.Minute
			// Env vars are resolved by the provider, which knows the pod's IP.
			cfg.SkipDownwardAPIResolution = true
			cfg.Client = client
			return nil
		},
		nodeutil.WithTLSConfig(
			nodeutil.WithKeyPairFromPath(c.tlsCert, c.tlsKey),
			nodeutil.WithCAFromPath(c.clientCA),
			func(t *tls.Config) error { t.CipherSuites = nil; return nil },
		),
		nodeutil.AttachProviderRoutes(mux),
	)
	if err != nil {
		return err
	}
	go vn.Run(ctx) //nolint:errcheck
	if err := vn.WaitReady(ctx, 2*time.Minute); err != nil {
		p.shutdown()
		return fmt.Errorf("node not ready: %w", err)
	}
	log.G(ctx).Infof("fedgate-vnode %s ready: pods %s on bridge %s, kubelet API on %s:%d, dns %s",
		c.nodeName, nw.cidr, c.bridge, nw.gateway, c.port, dns)
	select {
	case <-ctx.Done():
	case <-vn.Done():
	}
	// SIGTERM: kill every pod's processes and remove their namespaces before exiting.
	p.shutdown()
	if err := vn.Err(); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}
