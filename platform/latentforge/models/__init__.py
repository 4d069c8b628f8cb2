"""Encoder models used by precompute, training and generation.

`vae`           image autoencoders behind one interface (`load_vae`): diffusers `AutoencoderKL`,
                `AutoencoderTiny`, and the weight-free "patchify" autoencoder used by the demo
`text_encoder`  open_clip text towers (`load_text_encoder`): per-token states from a chosen
                layer plus the model's own pooled embedding; `save_tiny_clip_checkpoint` writes the
                tiny random CLIP tower the demo trains with
"""
