"""Optional integrations with other libraries, one module each; each imports its library itself.

- ``globalattn.integrations.transformers``: Hugging Face ``attn_implementation="global_attention"``
  and the ``GlobalAttentionCache`` for ``generate`` (install extra ``hf``).
"""
