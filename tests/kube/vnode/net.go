package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// podNet is the node's pod network: a bridge in the node's (= cluster's) network namespace
// holding the range's first address, one veth per pod into the pod's own namespace.
type podNet struct {
	cidr    *net.IPNet
	gateway net.IP
	bridge  string
	prefix  string

	mu   sync.Mutex
	used map[uint32]bool
}

func newPodNet(cidr, bridge, prefix string) (*podNet, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil || n.IP.To4() == nil {
		return nil, fmt.Errorf("--pod-cidr %q is not an IPv4 CIDR", cidr)
	}
	if ones, _ := n.Mask.Size(); ones > 29 {
		return nil, fmt.Errorf("--pod-cidr %q is too small", cidr)
	}
	if len(bridge) > 15 {
		return nil, fmt.Errorf("--bridge %q is longer than 15 bytes", bridge)
	}
	gw := ipAt(n, 1)
	return &podNet{cidr: n, gateway: gw, bridge: bridge, prefix: prefix, used: map[uint32]bool{}}, nil
}

func ipAt(n *net.IPNet, i uint32) net.IP {
	out := make(net.IP, 4)
	binary.BigEndian.PutUint32(out, binary.BigEndian.Uint32(n.IP.To4())+i)
	return out
}

func (p *podNet) prefixLen() int { ones, _ := p.cidr.Mask.Size(); return ones }

// ipCmd runs `ip args...` and returns an error with its output when it fails.
func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (p *podNet) setupBridge() error {
	if _, err := net.InterfaceByName(p.bridge); err != nil {
		if err := ipCmd("link", "add", p.bridge, "type", "bridge"); err != nil {
			return err
		}
	}
	addr := fmt.Sprintf("%s/%d", p.gateway, p.prefixLen())
	if err := ipCmd("addr", "replace", addr, "dev", p.bridge); err != nil {
		return err
	}
	return ipCmd("link", "set", p.bridge, "up")
}

// allocate reserves the lowest free address after the gateway.
func (p *podNet) allocate() (net.IP, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ones, bits := p.cidr.Mask.Size()
	size := uint32(1) << (bits - ones)
	for i := uint32(2); i < size-1; i++ {
		if !p.used[i] {
			p.used[i] = true
			return ipAt(p.cidr, i), nil
		}
	}
	return nil, fmt.Errorf("pod range %s is full", p.cidr)
}

// reserve keeps ip (e.g. the pods' DNS server's address) from being allocated to a pod.
func (p *podNet) reserve(ip net.IP) {
	if p.cidr.Contains(ip) {
		p.mu.Lock()
		p.used[binary.BigEndian.Uint32(ip.To4())-binary.BigEndian.Uint32(p.cidr.IP.To4())] = true
		p.mu.Unlock()
	}
}

func (p *podNet) release(ip net.IP) {
	if ip == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.used, binary.BigEndian.Uint32(ip.To4())-binary.BigEndian.Uint32(p.cidr.IP.To4()))
}

// names derives the pod's namespace name and the host end of its veth (15 bytes at most).
func (p *podNet) names(uid string) (netns, veth string) {
	h := sha256.Sum256([]byte(uid))
	s := hex.EncodeToString(h[:])
	return p.prefix + s[:10], "fv" + s[:10]
}

// setupPod creates the pod's namespace, its veth into the bridge, its address and default
// route, and the resolv.conf `ip netns exec` bind-mounts over /etc/resolv.conf.
func (p *podNet) setupPod(netns, veth string, ip net.IP, resolv string) error {
	_ = ipCmd("netns", "del", netns) // a leftover of an earlier run with the same pod uid
	_ = ipCmd("link", "del", veth)
	steps := [][]string{
		{"netns", "add", netns},
		{"-n", netns, "link", "set", "lo", "up"},
		{"link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns},
		{"link", "set", veth, "master", p.bridge, "up"},
		{"-n", netns, "addr", "add", fmt.Sprintf("%s/%d", ip, p.prefixLen()), "dev", "eth0"},
		{"-n", netns, "link", "set", "eth0", "up"},
		{"-n", netns, "route", "add", "default", "via", p.gateway.String()},
	}
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			return err
		}
	}
	dir := filepath.Join("/etc/netns", netns)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(resolv), 0o644)
}

func (p *podNet) teardownPod(netns, veth string) {
	_ = ipCmd("link", "del", veth)
	_ = ipCmd("netns", "del", netns)
	_ = os.RemoveAll(filepath.Join("/etc/netns", netns))
}
