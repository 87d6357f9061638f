# kmax_m2f: `make setup` installs everything into .venv; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
# Extra flags for `python -m venv`, e.g. VENV_ARGS=--system-site-packages to reuse a detectron2
# (and torch) already installed in the base interpreter.
VENV_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_PINS := torch==2.14.0 torchvision==0.29.2

DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.kmax_m2f-installed
EXT_SOURCES := setup.py $(shell find kmax_m2f/layers/ms_deform_attn/csrc -type f 2>/dev/null)

# make quickstart [MODEL=mask2former|kmax|structtoken|restr|loca]
MODEL ?= mask2former
QUICKSTART_CONFIG_mask2former := configs/synthetic/panoptic-segmentation/maskformer2_R18_synthetic.yaml
QUICKSTART_CONFIG_kmax := configs/synthetic/panoptic-segmentation/kmax_R18_synthetic.yaml
QUICKSTART_CONFIG_structtoken := configs/synthetic/semantic-segmentation/structtoken_vit_synthetic.yaml
QUICKSTART_CONFIG_restr := configs/synthetic/referring-segmentation/restr_vit_synthetic.yaml
QUICKSTART_DEMO_FLAGS_kmax := --show-clusters
QUICKSTART_DEMO_FLAGS_restr := --text "the blue stripes"
QUICKSTART_CONFIG = $(QUICKSTART_CONFIG_$(MODEL))
QUICKSTART_OUT = output/quickstart/$(MODEL)

# Compile and link the CUDA kernel on a machine with neither GPU nor CUDA toolkit: nvcc, the CUDA
# headers and libcudart come from NVIDIA's PyPI wheels (CUDA 13.0, torch's), unpacked under
# build/cuda-toolkit (about 250 MB). Catches build errors in csrc/ before a GPU is at hand; the
# extension it builds (build/cuda-check/) is not installed.
CUDA_TOOLKIT_WHEELS := nvidia-cuda-nvcc==13.0.* nvidia-nvvm==13.0.* nvidia-cuda-crt==13.0.* \
	nvidia-cuda-cccl==13.0.* nvidia-cuda-runtime==13.0.*
CUDA_TOOLKIT := $(CURDIR)/build/cuda-toolkit/nvidia/cu13

.PHONY: setup test quickstart clean-ext cuda-build-check

setup: $(EXT_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PIP) install -q --upgrade "pip>=24"

# torch, detectron2 and the pinned dependencies: re-run only when these recipes change.
$(DEPS_STAMP): $(PY) Makefile requirements.txt tools/install_detectron2.py
	$(PIP) install $(TORCH_PINS)
	$(PY) tools/install_detectron2.py
	$(PIP) install -r requirements.txt
	touch $@

# The package in editable mode; rebuilds kmax_m2f._C when its sources or setup.py change.
$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest tests

# Generate the synthetic set, train the small Mask2Former (or kMaX-DeepLab: MODEL=kmax; StructToken,
# semantic only: MODEL=structtoken; ReSTR, referring segmentation: MODEL=restr) on CPU (about 10
# minutes), evaluate it (PQ / mIoU / AP; ReSTR: oIoU / mIoU / Prec@X) and draw the results of 4
# validation images to output/quickstart/$(MODEL)/demo (kMaX: with the cluster assignments of every
# stage; ReSTR: the mask of "the blue stripes").
# MODEL=loca: LOCA pre-training on the synthetic training images (labels unused), then
# StructToken fine-tuned from those weights and from scratch (about 30 minutes); prints both mIoU.
quickstart: setup
	@test -n "$(QUICKSTART_CONFIG)" -o "$(MODEL)" = loca || { echo "MODEL must be mask2former, kmax, structtoken, restr or loca, got '$(MODEL)'"; exit 2; }
	$(PY) datasets/prepare_synthetic.py
ifeq ($(MODEL),loca)
	$(PY) tools/loca_transfer.py --output-dir $(QUICKSTART_OUT)
else
	$(PY) tools/train_net.py --config-file $(QUICKSTART_CONFIG) OUTPUT_DIR $(QUICKSTART_OUT)
	$(PY) tools/demo.py --config-file $(QUICKSTART_CONFIG) --output $(QUICKSTART_OUT)/demo $(QUICKSTART_DEMO_FLAGS_$(MODEL)) \
		--input $(addprefix datasets/synthetic/val/,000001.jpg 000002.jpg 000003.jpg 000004.jpg) \
		--opts MODEL.WEIGHTS $(QUICKSTART_OUT)/model_final.pth
endif

cuda-build-check: setup
	$(PIP) install -q --upgrade --no-deps --target build/cuda-toolkit $(CUDA_TOOLKIT_WHEELS)
	ln -sf libcudart.so.13 $(CUDA_TOOLKIT)/lib/libcudart.so
	CUDA_HOME=$(CUDA_TOOLKIT) FORCE_CUDA=1 $(PY) setup.py build_ext \
		--build-temp build/cuda-check/temp --build-lib build/cuda-check/lib

clean-ext:
	rm -rf build kmax_m2f/_C*.so $(EXT_STAMP)
