// Wrapper module: builds the commands of the release required below (tools/kube/kubebin.py reads its version here).
module batchgen.local/kube/jobset

go 1.26.0

require sigs.k8s.io/jobset v0.12.0

tool sigs.k8s.io/jobset
