"""GGUF export: a trained model as one file for llama.cpp, Ollama and LM Studio.

``preftune export RUN --gguf OUT.gguf`` (the command in :mod:`preftune.commands.export`, the work in
:mod:`.exporter`) loads the run, writes the weights (:mod:`.gguf_file`, layouts per family in
:mod:`.architectures`) and the tokenizer (:mod:`.vocab`), and with ``--ollama`` a Modelfile whose
template is the chat template in Go syntax (:mod:`.ollama`).
"""
