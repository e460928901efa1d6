# Set-up is part of every target: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORE  ?= stores/digits.zarr
CKPT   ?= stores/digits_cnn.safetensors
SEED_CKPTS := stores/digits_cnn-seed1.safetensors stores/digits_cnn-seed2.safetensors
CLIP_STORE ?= stores/digits_clip.zarr
CLIP_CKPT  ?= stores/clip_tiny.safetensors
INPAINT    ?= stores/digits_inpaint

.PHONY: demo test bench venv clean

venv: $(VENV)/.installed

# The tested versions are pinned in constraints.txt; pyproject.toml keeps loose ranges for users.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

$(CKPT): | venv
	$(PY) -m oodcli train classifier --out $(CKPT)

stores/digits_cnn-seed%.safetensors: | venv
	$(PY) -m oodcli train classifier --seed $* --out $@

$(CLIP_CKPT): | venv
	$(PY) -m oodcli train clip --out $(CLIP_CKPT)

$(INPAINT): | venv
	$(PY) -m oodcli train diffusion --out $(INPAINT)

demo: venv $(CKPT) $(SEED_CKPTS) $(CLIP_CKPT) $(INPAINT)
	$(PY) -m oodcli extract --model digits_cnn --weights $(CKPT) --benchmark digits --layers logits,penultimate,featmap --store $(STORE) --overwrite
	$(PY) -m oodcli score all --store $(STORE) --backbone digits_cnn
	$(PY) -m oodcli score temp-scaling --store $(STORE) --backbone digits_cnn -p temp-scaling.temperature=1000  # no NLL optimum on digits: every train and val image is right
	$(PY) -m oodcli score ash-s --as ash-s-featmap --store $(STORE) --backbone digits_cnn -p ash-s.layer=featmap  # shaped before pooling; by default the pooled vector, as the authors' code does
	$(PY) -m oodcli score scale --as scale-featmap --store $(STORE) --backbone digits_cnn -p scale.layer=featmap
	$(PY) -m oodcli sweep react --store $(STORE) --backbone digits_cnn && $(PY) -m oodcli score react --from-sweep --as react-swept --store $(STORE) --backbone digits_cnn
	$(PY) -m oodcli synthesize grood --store $(STORE) --model digits_cnn && $(PY) -m oodcli index --store $(STORE) --source grads/grood/train && $(PY) -m oodcli score grood,grood-distance,grood-gradnorm,grood-classgrad --store $(STORE) --backbone digits_cnn
	OODCLI="$(PY) -m oodcli" sh recipes/apex-digits.sh $(STORE)
	$(PY) -m oodcli score knn --id val --store $(STORE) --backbone digits_cnn  # the validation scores a threshold is set on
	$(PY) -m oodcli threshold knn --store $(STORE)
	$(PY) -m oodcli predict knn --store $(STORE) --data digits:ood/near/digits6-9 --out stores/digits-predictions.jsonl
	for s in 1 2; do $(PY) -m oodcli -q extract --model digits_cnn --weights stores/digits_cnn-seed$$s.safetensors --as digits_cnn-seed$$s --benchmark digits --layers logits --store $(STORE) || exit 1; done
	$(PY) -m oodcli score ensemble --store $(STORE) --backbone digits_cnn,digits_cnn-seed1,digits_cnn-seed2  # a deep ensemble of three seeds
	$(PY) -m oodcli report --store $(STORE)
	$(PY) -m oodcli report --store $(STORE) --fsood  # the shifted test digits (csid/digits-shifted) counted as ID
	$(PY) -m oodcli extract --model clip-tiny --weights $(CLIP_CKPT) --benchmark digits --layers image_embeds,penultimate,patch_values --store $(CLIP_STORE) --overwrite
	$(PY) -m oodcli score mcm,gl-mcm,r-mcm --store $(CLIP_STORE)
	$(PY) -m oodcli -q train coop --store $(CLIP_STORE) --shots 16 --epochs 20 --out stores/digits-coop.safetensors
	$(PY) -m oodcli -q train negprompt --store $(CLIP_STORE) --positive stores/digits-coop.safetensors --out stores/digits-negprompt.safetensors
	$(PY) -m oodcli -q train coop --store $(CLIP_STORE) --shots 16 --epochs 20 --train-classes 0-2 --out stores/digits-coop-0-2.safetensors
	$(PY) -m oodcli -q train negprompt --store $(CLIP_STORE) --positive stores/digits-coop-0-2.safetensors --out stores/digits-negprompt-0-2.safetensors
	$(PY) -m oodcli -q train locoop --store $(CLIP_STORE) --shots 16 --epochs 20 --top-k 2 --out stores/digits-locoop.safetensors
	$(PY) -m oodcli score coop,locoop,negprompt --store $(CLIP_STORE) -p coop.prompts=stores/digits-coop.safetensors -p locoop.prompts=stores/digits-locoop.safetensors -p negprompt.prompts=stores/digits-negprompt.safetensors
	$(PY) -m oodcli score negprompt --as negprompt-open-0-2 --store $(CLIP_STORE) -p negprompt.prompts=stores/digits-negprompt-0-2.safetensors
	$(PY) -m oodcli -q train iim --store $(CLIP_STORE) --shots 16 --k 4 --out stores/digits-iim.safetensors
	$(PY) -m oodcli score s-mcm,s-mcm-star,r-mcm-trained,gl-mcm-local --store $(CLIP_STORE) -p s-mcm.prompts=stores/digits-iim.safetensors -p s-mcm-star.prompts=stores/digits-iim.safetensors -p r-mcm-trained.prompts=stores/digits-iim.safetensors -p gl-mcm-local.prompts=stores/digits-iim.safetensors
	$(PY) -m oodcli score neglabel --store $(CLIP_STORE)
	$(PY) -m oodcli synthesize context-labels --store $(CLIP_STORE) --split train --per-class 5 --out stores/digits-context.jsonl
	$(PY) -m oodcli synthesize synood --store $(CLIP_STORE) --per-class 5 --context-labels stores/digits-context.jsonl --pipeline $(INPAINT) --classifier digits_cnn --classifier-weights $(CKPT) --out-dir stores/digits-synood
	$(PY) -m oodcli extract --model clip-tiny --weights $(CLIP_CKPT) --data folder:$(CURDIR)/stores/digits-synood --split synthetic/synood --role synthetic --layers image_embeds,penultimate --store $(CLIP_STORE) --overwrite
	$(PY) -m oodcli -q train synood --store $(CLIP_STORE) --out stores/digits-synood.safetensors
	$(PY) -m oodcli score synood --store $(CLIP_STORE) -p synood.prompts=stores/digits-synood.safetensors
	$(PY) -m oodcli score synood --as synood-projection-only --store $(CLIP_STORE) -p synood.prompts=stores/digits-synood.safetensors -p synood.ft_labels=false
	$(PY) -m oodcli score synood --as synood-labels-only --store $(CLIP_STORE) -p synood.prompts=stores/digits-synood.safetensors -p synood.projection=false
	$(PY) -m oodcli report --store $(CLIP_STORE)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/scorers.py
	$(PY) benchmarks/grood.py
	$(PY) benchmarks/clip.py
	$(PY) benchmarks/apex.py
	$(PY) benchmarks/store.py
	$(PY) benchmarks/cli.py
	$(PY) benchmarks/prompts.py
	$(PY) benchmarks/synood.py
	$(PY) benchmarks/synood_synthesis.py
	$(PY) benchmarks/sweep.py

clean:
	rm -rf $(STORE) $(CKPT) $(CLIP_STORE) $(CLIP_CKPT) $(INPAINT) stores/digits-*.safetensors stores/digits-context.jsonl stores/digits-synood stores/digits-predictions.jsonl
