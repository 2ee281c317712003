package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/log"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	corev1listers "k8s.io/client-go/listers/core/v1"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
	utilexec "k8s.io/utils/exec"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// provider runs each pod's containers as host processes in the pod's network namespace.
type provider struct {
	net           *podNet
	dns           string
	stateDir      string
	nodeName      string
	clusterDomain string
	configMaps    corev1listers.ConfigMapLister
	secrets       corev1listers.SecretLister

	client kubernetes.Interface

	mu     sync.Mutex
	pods   map[string]*podState // by namespace/name
	notify func(*corev1.Pod)
	// Status notifications go out in order through one goroutine (notifier): publish marks a
	// pod dirty, the notifier snapshots it when it gets to it; finals are deleted pods' last
	// statuses.
	dirty  map[string]bool
	finals []*corev1.Pod
	kick   chan struct{}
}

type podState struct {
	pod         *corev1.Pod // spec as last given; status rebuilt by status()
	netns, veth string
	ip          net.IP
	dir         string
	started     metav1.Time
	ctrs        []*ctrState
	deleted     bool
	stop        chan struct{} // closed when the pod is being deleted: ends back-offs
	stopOnce    sync.Once
}

type ctrState struct {
	spec     corev1.Container
	log      string
	status   corev1.ContainerStatus
	everRan  bool
	pgid     int
	done     chan struct{} // closed when the supervisor returns
	exited   chan struct{} // closed when the current process exits (replaced per start)
	finished bool          // will not run again
}

func key(ns, name string) string { return ns + "/" + name }

func (p *provider) NotifyPods(_ context.Context, cb func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = cb
	p.mu.Unlock()
}

// publish has the pod's current status sent to virtual-kubelet; p.mu must be held.
func (p *provider) publish(ps *podState) {
	p.dirty[key(ps.pod.Namespace, ps.pod.Name)] = true
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// notifier delivers the notifications publish and DeletePod queue, in order.
func (p *provider) notifier(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		}
		p.mu.Lock()
		var out []*corev1.Pod
		for k := range p.dirty {
			if ps, ok := p.pods[k]; ok {
				out = append(out, p.snapshot(ps))
			}
		}
		out = append(out, p.finals...)
		p.dirty, p.finals = map[string]bool{}, nil
		notify := p.notify
		p.mu.Unlock()
		for _, pod := range out {
			notify(pod)
		}
	}
}

func (p *provider) CreatePod(ctx context.Context, pod *corev1.Pod) error {
	ip, err := p.net.allocate()
	if err != nil {
		return err
	}
	netns, veth := p.net.names(string(pod.UID))
	ps := &podState{
		pod: pod.DeepCopy(), netns: netns, veth: veth, ip: ip, started: metav1.Now(), stop: make(chan struct{}),
		dir: filepath.Join(p.stateDir, fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
	}
	resolv := fmt.Sprintf("nameserver %s\nsearch %s.svc.%s svc.%s %s\noptions ndots:5\n",
		p.dns, pod.Namespace, p.clusterDomain, p.clusterDomain, p.clusterDomain)
	if err := os.MkdirAll(ps.dir, 0o755); err != nil {
		p.net.release(ip)
		return err
	}
	if err := p.net.setupPod(netns, veth, ip, resolv); err != nil {
		p.net.teardownPod(netns, veth)
		p.net.release(ip)
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pods[key(pod.Namespace, pod.Name)] = ps
	for _, c := range pod.Spec.Containers {
		cs := &ctrState{
			spec: c, log: filepath.Join(ps.dir, c.Name+".log"), done: make(chan struct{}),
			status: corev1.ContainerStatus{
				Name: c.Name, Image: c.Image, ImageID: "fedgate-vnode://ignored",
				State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}},
			},
		}
		ps.ctrs = append(ps.ctrs, cs)
	}
	if len(pod.Spec.InitContainers) > 0 {
		log.G(ctx).Warnf("pod %s/%s: init containers are not run by fedgate-vnode", pod.Namespace, pod.Name)
	}
	for _, cs := range ps.ctrs {
		go p.supervise(ps, cs)
	}
	log.G(ctx).Infof("pod %s/%s: ip %s, netns %s", pod.Namespace, pod.Name, ip, netns)
	p.publish(ps)
	return nil
}

func (p *provider) UpdatePod(_ context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ps, ok := p.pods[key(pod.Namespace, pod.Name)]; ok {
		ps.pod = pod.DeepCopy()
		p.publish(ps)
	}
	return nil
}

func (p *provider) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	ps, ok := p.pods[key(pod.Namespace, pod.Name)]
	if !ok {
		p.mu.Unlock()
		return errdefs.NotFound("pod not found")
	}
	ps.deleted = true
	grace := 5 * time.Second
	if g := pod.Spec.TerminationGracePeriodSeconds; g != nil && time.Duration(*g)*time.Second < grace {
		grace = time.Duration(*g) * time.Second
	}
	p.mu.Unlock()
	p.stopPod(ps, grace)
	p.mu.Lock()
	delete(p.pods, key(pod.Namespace, pod.Name))
	snap := p.snapshot(ps)
	snap.Status.Phase = corev1.PodSucceeded
	snap.Status.Reason = "Deleted"
	p.finals = append(p.finals, snap)
	select {
	case p.kick <- struct{}{}:
	default:
	}
	p.mu.Unlock()
	// As the kubelet does once a deleted pod's containers are gone: remove the object now
	// (virtual-kubelet itself would wait for the whole grace period first).
	zero := int64(0)
	err := p.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: metav1.NewUIDPreconditions(string(pod.UID)),
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		log.G(ctx).Warnf("pod %s/%s: deleting the object: %v", pod.Namespace, pod.Name, err)
	}
	log.G(ctx).Infof("pod %s/%s deleted", pod.Namespace, pod.Name)
	return nil
}

// stopPod sends SIGTERM to every container's process group, SIGKILL after grace, waits for the
// supervisors, then removes the pod's network.
func (p *provider) stopPod(ps *podState, grace time.Duration) {
	p.mu.Lock()
	ps.deleted = true
	ps.stopOnce.Do(func() { close(ps.stop) })
	for _, cs := range ps.ctrs {
		if cs.pgid > 0 {
			_ = syscall.Kill(-cs.pgid, syscall.SIGTERM)
		}
	}
	p.mu.Unlock()
	deadline := time.After(grace)
	for _, cs := range ps.ctrs {
		select {
		case <-cs.done:
		case <-deadline:
		}
	}
	p.mu.Lock()
	for _, cs := range ps.ctrs {
		if cs.pgid > 0 {
			_ = syscall.Kill(-cs.pgid, syscall.SIGKILL)
		}
	}
	p.mu.Unlock()
	for _, cs := range ps.ctrs {
		<-cs.done
	}
	// Anything left in the namespace (e.g. a process that left the group) dies with it.
	if out, err := exec.Command("ip", "netns", "pids", ps.netns).Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	p.net.teardownPod(ps.netns, ps.veth)
	p.net.release(ps.ip)
}

// shutdown stops every pod (SIGTERM to the vnode).
func (p *provider) shutdown() {
	p.mu.Lock()
	all := make([]*podState, 0, len(p.pods))
	for _, ps := range p.pods {
		all = append(all, ps)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, ps := range all {
		wg.Add(1)
		go func() { defer wg.Done(); p.stopPod(ps, 2*time.Second) }()
	}
	wg.Wait()
}

func (p *provider) GetPod(_ context.Context, namespace, name string) (*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps, ok := p.pods[key(namespace, name)]
	if !ok {
		return nil, errdefs.NotFoundf("pod %s/%s is not known to the provider", namespace, name)
	}
	return p.snapshot(ps), nil
}

func (p *provider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

func (p *provider) GetPods(context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*corev1.Pod, 0, len(p.pods))
	for _, ps := range p.pods {
		out = append(out, p.snapshot(ps))
	}
	return out, nil
}

// snapshot is the pod with its current status; p.mu must be held.
func (p *provider) snapshot(ps *podState) *corev1.Pod {
	pod := ps.pod.DeepCopy()
	st := corev1.PodStatus{
		HostIP:    p.net.gateway.String(),
		HostIPs:   []corev1.HostIP{{IP: p.net.gateway.String()}},
		PodIP:     ps.ip.String(),
		PodIPs:    []corev1.PodIP{{IP: ps.ip.String()}},
		StartTime: &ps.started,
		QOSClass:  corev1.PodQOSBestEffort,
	}
	allReady, anyRunning, allFinished, anyFailed, anyRan := true, false, true, false, false
	for _, cs := range ps.ctrs {
		s := *cs.status.DeepCopy()
		st.ContainerStatuses = append(st.ContainerStatuses, s)
		allReady = allReady && s.Ready
		anyRunning = anyRunning || s.State.Running != nil
		allFinished = allFinished && cs.finished
		anyRan = anyRan || cs.everRan
		if t := s.State.Terminated; cs.finished && t != nil && t.ExitCode != 0 {
			anyFailed = true
		}
	}
	switch {
	case allFinished && anyFailed:
		st.Phase = corev1.PodFailed
	case allFinished:
		st.Phase = corev1.PodSucceeded
	case anyRunning || anyRan:
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: ps.started}
	}
	ready := allReady && len(ps.ctrs) > 0
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodScheduled, true), cond(corev1.PodInitialized, true),
		cond(corev1.ContainersReady, ready), cond(corev1.PodReady, ready),
	}
	pod.Status = st
	return pod
}

// supervise runs one container: starts it, records its state, restarts it per restartPolicy.
func (p *provider) supervise(ps *podState, cs *ctrState) {
	defer close(cs.done)
	policy := ps.pod.Spec.RestartPolicy
	backoff := time.Second
	for {
		p.mu.Lock()
		if ps.deleted {
			cs.finished = true
			p.mu.Unlock()
			return
		}
		cmd, exited, err := p.start(ps, cs)
		now := metav1.Now()
		name := fmt.Sprintf("%s/%s[%s]", ps.pod.Namespace, ps.pod.Name, cs.spec.Name)
		if err != nil {
			log.L.Warnf("container %s cannot start: %v", name, err)
			term := &corev1.ContainerStateTerminated{ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: now, FinishedAt: now}
			cs.status.Ready, cs.status.Started = false, ptr(false)
			if policy == corev1.RestartPolicyNever {
				cs.status.State = corev1.ContainerState{Terminated: term}
				cs.finished = true
				p.publish(ps)
				p.mu.Unlock()
				return
			}
			cs.status.LastTerminationState = corev1.ContainerState{Terminated: term}
			cs.status.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "RunContainerError", Message: err.Error()}}
			p.publish(ps)
			p.mu.Unlock()
		} else {
			log.L.Infof("container %s started: pid %d", name, cmd.Process.Pid)
			cs.everRan = true
			cs.status.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
			cs.status.Started = ptr(true)
			cs.status.Ready = cs.spec.ReadinessProbe == nil
			cs.status.ContainerID = fmt.Sprintf("fedgate-vnode://%d", cmd.Process.Pid)
			p.publish(ps)
			p.mu.Unlock()
			if cs.spec.ReadinessProbe != nil {
				go p.probe(ps, cs, exited)
			}
			werr := cmd.Wait()
			close(exited)
			code := 0
			if werr != nil {
				code = -1
				if ee, ok := werr.(*exec.ExitError); ok {
					if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
						code = 128 + int(ws.Signal())
					} else {
						code = ee.ExitCode()
					}
				}
			}
			reason := "Completed"
			if code != 0 {
				reason = "Error"
			}
			log.L.Infof("container %s exited with %d", name, code)
			p.mu.Lock()
			cs.pgid = 0
			term := &corev1.ContainerStateTerminated{ExitCode: int32(code), Reason: reason, StartedAt: now, FinishedAt: metav1.Now(), ContainerID: cs.status.ContainerID}
			cs.status.State = corev1.ContainerState{Terminated: term}
			cs.status.Ready = false
			stop := ps.deleted || policy == corev1.RestartPolicyNever || (policy == corev1.RestartPolicyOnFailure && code == 0)
			if stop {
				cs.finished = true
				p.publish(ps)
				p.mu.Unlock()
				return
			}
			if time.Since(now.Time) > 10*time.Second {
				backoff = time.Second
			}
			cs.status.LastTerminationState = corev1.ContainerState{Terminated: term}
			cs.status.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
				Reason: "CrashLoopBackOff", Message: fmt.Sprintf("back-off %s restarting failed container %s", backoff, cs.spec.Name)}}
			p.publish(ps)
			p.mu.Unlock()
		}
		select {
		case <-time.After(backoff):
		case <-ps.stop:
		}
		backoff = min(backoff*2, 20*time.Second)
		p.mu.Lock()
		cs.status.RestartCount++
		p.mu.Unlock()
	}
}

func ptr[T any](v T) *T { return &v }

// start launches the container's command in the pod's namespace; p.mu is held.
func (p *provider) start(ps *podState, cs *ctrState) (*exec.Cmd, chan struct{}, error) {
	c := cs.spec
	command := c.Command
	if len(command) == 0 {
		command = imageEntrypoint(c.Image)
	}
	if len(command) == 0 && len(c.Args) == 0 {
		return nil, nil, fmt.Errorf("container %q has no command and no args: fedgate-vnode ignores the image (%s) and runs command+args as a host process", c.Name, c.Image)
	}
	env, err := p.env(ps, c)
	if err != nil {
		return nil, nil, err
	}
	lookup := func(k string) (string, bool) {
		for i := len(env) - 1; i >= 0; i-- {
			if name, v, _ := strings.Cut(env[i], "="); name == k {
				return v, true
			}
		}
		return "", false
	}
	argv := make([]string, 0, len(command)+len(c.Args))
	for _, a := range append(append([]string{}, command...), c.Args...) {
		argv = append(argv, expand(a, lookup))
	}
	path, _ := lookup("PATH")
	bin, err := lookPath(argv[0], path)
	if err != nil {
		return nil, nil, err
	}
	if cs.everRan {
		_ = os.Rename(cs.log, cs.log+".previous")
	}
	logf, err := os.OpenFile(cs.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ps.netns, bin}, argv[1:]...)...)
	cmd.Env = env
	cmd.Dir = "/"
	if c.WorkingDir != "" {
		cmd.Dir = c.WorkingDir
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	cs.pgid = cmd.Process.Pid
	exited := make(chan struct{})
	cs.exited = exited
	return cmd, exited, nil
}

// imageEntrypoints holds the ENTRYPOINT of the images whose containers run here without a
// command of their own (Kubernetes runs the image's ENTRYPOINT with the container's args):
// the images of the MCS conformance suite's pods. Any other image counts as one without an
// ENTRYPOINT (busybox, alpine, debian ...): its args are the command line.
var imageEntrypoints = map[string][]string{
	"alpine/socat": {"socat"},
}

// imageEntrypoint is the ENTRYPOINT of image (registry, tag and digest aside), nil if none
// is known.
func imageEntrypoint(image string) []string {
	name, _, _ := strings.Cut(image, "@")
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name = name[:i]
	}
	name = strings.TrimPrefix(name, "docker.io/")
	return imageEntrypoints[name]
}

// lookPath resolves a command as execvp would with the container's PATH.
func lookPath(name, path string) (string, error) {
	check := func(f string) error {
		st, err := os.Stat(f)
		if err != nil {
			return err
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return fmt.Errorf("%s: permission denied", f)
		}
		return nil
	}
	if strings.Contains(name, "/") {
		if err := check(name); err != nil {
			return "", fmt.Errorf("exec: %q: %v", name, err)
		}
		return name, nil
	}
	if path == "" {
		path = defaultPath
	}
	for _, d := range filepath.SplitList(path) {
		if f := filepath.Join(d, name); check(f) == nil {
			return f, nil
		}
	}
	return "", fmt.Errorf("exec: %q: executable file not found in $PATH (%s)", name, path)
}

var refRE = regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)`)

// expand replaces $(VAR) with the container's env value as the kubelet does ($$ escapes $).
func expand(s string, lookup func(string) (string, bool)) string {
	return refRE.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		if v, ok := lookup(m[2 : len(m)-1]); ok {
			return v
		}
		return m
	})
}

// env is the container's environment: a base, then env (plain values, fieldRef,
// configMapKeyRef, secretKeyRef; $(VAR) expanded).
func (p *provider) env(ps *podState, c corev1.Container) ([]string, error) {
	pod := ps.pod
	env := []string{"PATH=" + defaultPath, "HOME=/root", "HOSTNAME=" + pod.Name}
	lookup := func(k string) (string, bool) {
		for i := len(env) - 1; i >= 0; i-- {
			if name, v, _ := strings.Cut(env[i], "="); name == k {
				return v, true
			}
		}
		return "", false
	}
	for _, e := range c.Env {
		v := expand(e.Value, lookup)
		if f := e.ValueFrom; f != nil {
			var err error
			switch {
			case f.FieldRef != nil:
				v, err = p.field(ps, f.FieldRef.FieldPath)
			case f.ConfigMapKeyRef != nil:
				v, err = "", fmt.Errorf("configMap %q not found", f.ConfigMapKeyRef.Name)
				if cm, gerr := p.configMaps.ConfigMaps(pod.Namespace).Get(f.ConfigMapKeyRef.Name); gerr == nil {
					v, err = cm.Data[f.ConfigMapKeyRef.Key], nil
				}
				if err != nil && f.ConfigMapKeyRef.Optional != nil && *f.ConfigMapKeyRef.Optional {
					continue
				}
			case f.SecretKeyRef != nil:
				v, err = "", fmt.Errorf("secret %q not found", f.SecretKeyRef.Name)
				if s, gerr := p.secrets.Secrets(pod.Namespace).Get(f.SecretKeyRef.Name); gerr == nil {
					v, err = string(s.Data[f.SecretKeyRef.Key]), nil
				}
				if err != nil && f.SecretKeyRef.Optional != nil && *f.SecretKeyRef.Optional {
					continue
				}
			default:
				continue // resourceFieldRef, fileKeyRef: not supported
			}
			if err != nil {
				return nil, fmt.Errorf("env %s: %v", e.Name, err)
			}
		}
		env = append(env, e.Name+"="+v)
	}
	return env, nil
}

func (p *provider) field(ps *podState, path string) (string, error) {
	pod := ps.pod
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return p.nodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP", "status.podIPs":
		return ps.ip.String(), nil
	case "status.hostIP", "status.hostIPs":
		return p.net.gateway.String(), nil
	}
	for prefix, m := range map[string]map[string]string{"metadata.labels": pod.Labels, "metadata.annotations": pod.Annotations} {
		if k, ok := strings.CutPrefix(path, prefix+"['"); ok && strings.HasSuffix(k, "']") {
			return m[strings.TrimSuffix(k, "']")], nil
		}
	}
	return "", fmt.Errorf("fieldRef %q is not supported by fedgate-vnode", path)
}

// probe runs the readiness probe while the current process lives (exec, tcpSocket, httpGet).
func (p *provider) probe(ps *podState, cs *ctrState, exited chan struct{}) {
	pr := cs.spec.ReadinessProbe
	period := time.Duration(max(pr.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(pr.TimeoutSeconds, 1)) * time.Second
	select {
	case <-time.After(time.Duration(pr.InitialDelaySeconds) * time.Second):
	case <-exited:
		return
	}
	for {
		ok := p.probeOnce(ps, cs, pr, timeout)
		p.mu.Lock()
		select {
		case <-exited:
			p.mu.Unlock()
			return
		default:
		}
		if cs.status.Ready != ok {
			cs.status.Ready = ok
			p.publish(ps)
		}
		p.mu.Unlock()
		select {
		case <-time.After(period):
		case <-exited:
			return
		}
	}
}

func (p *provider) probeOnce(ps *podState, cs *ctrState, pr *corev1.Probe, timeout time.Duration) bool {
	port := func(v intstr.IntOrString) string {
		if v.Type == intstr.Int {
			return strconv.Itoa(v.IntValue())
		}
		for _, cp := range cs.spec.Ports {
			if cp.Name == v.StrVal {
				return strconv.Itoa(int(cp.ContainerPort))
			}
		}
		return v.StrVal
	}
	switch {
	case pr.Exec != nil:
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ps.netns}, pr.Exec.Command...)...).Run() == nil
	case pr.TCPSocket != nil:
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(ps.ip.String(), port(pr.TCPSocket.Port)), timeout)
		if err == nil {
			conn.Close()
		}
		return err == nil
	case pr.HTTPGet != nil:
		cl := http.Client{Timeout: timeout}
		resp, err := cl.Get(fmt.Sprintf("http://%s%s", net.JoinHostPort(ps.ip.String(), port(pr.HTTPGet.Port)), pr.HTTPGet.Path))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 400
	}
	return true
}

func (p *provider) container(namespace, pod, name string) (*podState, *ctrState, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps, ok := p.pods[key(namespace, pod)]
	if !ok {
		return nil, nil, errdefs.NotFoundf("pod %s/%s not found", namespace, pod)
	}
	for _, cs := range ps.ctrs {
		if cs.spec.Name == name || name == "" {
			return ps, cs, nil
		}
	}
	return nil, nil, errdefs.NotFoundf("container %q not found in pod %s/%s", name, namespace, pod)
}

// GetContainerLogs serves the container's log file (tailLines, follow, previous, limitBytes).
func (p *provider) GetContainerLogs(ctx context.Context, namespace, pod, container string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	_, cs, err := p.container(namespace, pod, container)
	if err != nil {
		return nil, err
	}
	path := cs.log
	if opts.Previous {
		path += ".previous"
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if os.IsNotExist(err) {
			return io.NopCloser(bytes.NewReader(nil)), nil
		}
		return nil, err
	}
	offset := int64(len(data))
	if opts.Tail > 0 {
		lines := bytes.SplitAfter(data, []byte("\n"))
		if len(lines) > 0 && len(lines[len(lines)-1]) == 0 {
			lines = lines[:len(lines)-1]
		}
		if len(lines) > opts.Tail {
			data = bytes.Join(lines[len(lines)-opts.Tail:], nil)
		}
	}
	if opts.LimitBytes > 0 && len(data) > opts.LimitBytes {
		data = data[:opts.LimitBytes]
	}
	if !opts.Follow || opts.Previous {
		return io.NopCloser(bytes.NewReader(data)), nil
	}
	pr, pw := io.Pipe()
	p.mu.Lock()
	exited := cs.exited
	p.mu.Unlock()
	go func() {
		defer pw.Close()
		if _, err := pw.Write(data); err != nil {
			return
		}
		f, err := os.Open(path)
		if err != nil {
			return
		}
		defer f.Close()
		if _, err := f.Seek(offset, io.SeekStart); err != nil {
			return
		}
		r := bufio.NewReader(f)
		buf := make([]byte, 32<<10)
		for {
			n, _ := r.Read(buf)
			if n > 0 {
				if _, err := pw.Write(buf[:n]); err != nil {
					return
				}
				continue
			}
			select {
			case <-ctx.Done():
				return
			case <-exited:
				if n, _ := r.Read(buf); n > 0 {
					_, _ = pw.Write(buf[:n])
					continue
				}
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return pr, nil
}

// RunInContainer runs cmd in the pod's network namespace (kubectl exec). No TTY: a requested
// terminal gets plain pipes.
func (p *provider) RunInContainer(ctx context.Context, namespace, pod, container string, cmd []string, attach api.AttachIO) error {
	ps, cs, err := p.container(namespace, pod, container)
	if err != nil {
		return err
	}
	if len(cmd) == 0 {
		return errdefs.InvalidInput("no command")
	}
	p.mu.Lock()
	env, err := p.env(ps, cs.spec)
	p.mu.Unlock()
	if err != nil {
		return err
	}
	c := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ps.netns}, cmd...)...)
	c.Env = env
	c.Dir = "/"
	if in := attach.Stdin(); in != nil {
		c.Stdin = in
	}
	if out := attach.Stdout(); out != nil {
		c.Stdout = out
		defer out.Close()
	}
	if e := attach.Stderr(); e != nil {
		c.Stderr = e
		defer e.Close()
	} else if attach.TTY() {
		c.Stderr = c.Stdout
	}
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	c.Cancel = func() error { return syscall.Kill(-c.Process.Pid, syscall.SIGKILL) }
	c.WaitDelay = 2 * time.Second
	if attach.Resize() != nil {
		go func() {
			for range attach.Resize() {
			}
		}()
	}
	if err := c.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return utilexec.CodeExitError{Err: err, Code: ee.ExitCode()}
		}
		return err
	}
	return nil
}

func (p *provider) AttachToContainer(context.Context, string, string, string, api.AttachIO) error {
	return errdefs.InvalidInput("attach is not supported by fedgate-vnode")
}

func (p *provider) PortForward(context.Context, string, string, int32, io.ReadWriteCloser) error {
	return errdefs.InvalidInput("port-forward is not supported by fedgate-vnode")
}

func (p *provider) GetStatsSummary(context.Context) (*statsv1alpha1.Summary, error) {
	return &statsv1alpha1.Summary{Node: statsv1alpha1.NodeStats{NodeName: p.nodeName}}, nil
}

func (p *provider) GetMetricsResource(context.Context) ([]*dto.MetricFamily, error) {
	return nil, nil
}
