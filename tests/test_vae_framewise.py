"""Framewise decoding with carried causal context must equal a one-shot decode (no seams, no lost frames)."""

import pytest
import torch

from batchgen.models.common.vae import enable_causal_framewise_decoding


def _tiny_vae():
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(0)
    return AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()


@pytest.mark.parametrize("latent_frames", [1, 3, 5])
def test_framewise_equals_one_shot(latent_frames):
    vae = _tiny_vae()
    vae.num_latent_frames_batch_size = 2  # several frame groups even for short clips
    z = torch.randn(1, 12, latent_frames, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_shot = vae.decode(z, return_dict=False)[0]
        enable_causal_framewise_decoding(vae, tiling=False)
        framewise = vae.decode(z, return_dict=False)[0]
    assert framewise.shape[2] == 6 * latent_frames - 5
    assert framewise.shape == one_shot.shape
    torch.testing.assert_close(framewise, one_shot, atol=1e-5, rtol=1e-5)


def test_stock_framewise_switch_is_what_we_avoid():
    """Documents the diffusers behaviour this module works around; if diffusers fixes it, this fails and the
    workaround can be revisited."""
    vae = _tiny_vae()
    vae._enable_framewise_decoding()
    z = torch.randn(1, 12, 3, 4, 6)
    # The stock switch decodes frame by frame with constant padding: a conv then meets an input smaller than its
    # 3x3x3 kernel. Any other error (or none) means diffusers changed.
    too_short = (
        r"Calculated padded input size per channel: \(4 x 2 x 4\)\. Kernel size: \(3 x 3 x 3\)\. Kernel size can't"
    )
    with torch.no_grad(), pytest.raises(RuntimeError, match=too_short):
        vae.decode(z, return_dict=False)


def test_enable_refuses_constant_padding():
    vae = _tiny_vae()
    vae._enable_framewise_decoding()
    with pytest.raises(ValueError, match="replicate"):
        enable_causal_framewise_decoding(vae)
