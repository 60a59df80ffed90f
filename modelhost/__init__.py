"""What every process that hosts a model needs: the learner, rollout and reward actors.

- ``loading``: a Hugging Face model or tokenizer from a local folder or the hub, quietly,
  with one-line errors;
- ``weights``: a model's tensors without tied duplicates (GPT-2's ``lm_head.weight`` is its
  input embedding), the one rule every weight transfer follows;
- ``process``: the device a process uses and where it runs (each actor's ``ping``);
- ``errors``: an exception's text in one line.

A leaf: it imports torch, transformers and (lazily) ray, never ``learner``, ``actors`` or
``rewards``, so all three may import it without breaking the one-way arrows.
"""
