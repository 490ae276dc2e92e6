// Wrapper module: builds the commands of the release required below (tools/kube/kubebin.py reads its version here).
module batchgen.local/kube/kueue

go 1.26.0

require sigs.k8s.io/kueue v0.17.0

tool sigs.k8s.io/kueue/cmd/kueue
