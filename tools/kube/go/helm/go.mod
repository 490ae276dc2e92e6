// Wrapper module: builds the commands of the release required below (tools/kube/kubebin.py reads its version here).
module batchgen.local/kube/helm

go 1.26.0

require helm.sh/helm/v4 v4.3.2

tool helm.sh/helm/v4/cmd/helm
