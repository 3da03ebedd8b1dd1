"""The chips a plan can target: peak compute, memory and links, one row per chip.

Units, the same in every row: TFLOP/s dense (no 2:4 sparsity); GiB = 2**30 bytes; every
bandwidth in GB/s = 1e9 bytes/s, one direction, summed over the chip's links (vendors quote
NVLink and ICI both ways, networks in Gb/s: the figures below are converted, and
docs/performance.md gives each vendor figure as written, with its document).
"""

import dataclasses

from moejax.config_ranges import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (a GPU, or a TPU chip) and the system it ships in."""

    name: str
    platform: str  # "gpu" or "tpu": whose kernels run on it (the grouped matmuls' tiles)
    bf16_tflops: float  # dense peak
    fp8_tflops: float  # dense peak; = bf16 where the docs give fp8 no faster rate (v5p, v6e)
    hbm_gib: float  # what software can allocate: nvidia-smi's total, or the TPU docs' figure
    hbm_gb_per_s: float
    scaleup_gb_per_s: float  # NVLink or ICI, one direction, all links of the chip
    scaleup_links: int  # NVLink links, or ICI ports
    scaleup_topology: str
    scaleup_chips: int  # the most chips one NVLink domain or ICI slice holds
    network_gb_per_s: float  # scale-out per chip, one direction: InfiniBand NIC, or TPU DCN
    host_gb_per_s: float  # chip to host CPU, one direction: PCIe, or GB200's NVLink-C2C
    chips_per_host: int
    devices_per_chip: int = 1  # JAX devices a chip shows: Ironwood's two chiplets show two

    @property
    def devices_per_host(self) -> int:
        return self.chips_per_host * self.devices_per_chip


_GBIT = 1 / 8  # GB/s per Gb/s

TARGETS = {
    "h100": Chip("NVIDIA H100 SXM5 80GB", "gpu", bf16_tflops=989, fp8_tflops=1979,
                 hbm_gib=81559 / 1024, hbm_gb_per_s=3350,
                 scaleup_gb_per_s=900 / 2, scaleup_links=18,
                 scaleup_topology="NVLink 4, NVSwitch all-to-all", scaleup_chips=8,
                 network_gb_per_s=400 * _GBIT, host_gb_per_s=128 / 2, chips_per_host=8),
    "h200": Chip("NVIDIA H200 SXM 141GB", "gpu", bf16_tflops=989, fp8_tflops=1979,
                 hbm_gib=143771 / 1024, hbm_gb_per_s=4800,
                 scaleup_gb_per_s=900 / 2, scaleup_links=18,
                 scaleup_topology="NVLink 4, NVSwitch all-to-all", scaleup_chips=8,
                 network_gb_per_s=400 * _GBIT, host_gb_per_s=128 / 2, chips_per_host=8),
    # HGX/DGX B200 at 1,000 W; GB200 runs its B200s at 1,200 W, hence its higher peaks.
    "b200": Chip("NVIDIA B200 (HGX/DGX B200)", "gpu", bf16_tflops=2250, fp8_tflops=4500,
                 hbm_gib=183359 / 1024, hbm_gb_per_s=8000,
                 scaleup_gb_per_s=1800 / 2, scaleup_links=18,
                 scaleup_topology="NVLink 5, NVSwitch all-to-all", scaleup_chips=8,
                 network_gb_per_s=400 * _GBIT, host_gb_per_s=128 / 2, chips_per_host=8),
    # A compute tray: 2 Grace CPUs, 4 GPUs; one Grace's 900 GB/s (both ways) C2C feeds 2 GPUs.
    "gb200": Chip("NVIDIA GB200 NVL72 (per GPU)", "gpu", bf16_tflops=2500, fp8_tflops=5000,
                  hbm_gib=189471 / 1024, hbm_gb_per_s=8000,
                  scaleup_gb_per_s=1800 / 2, scaleup_links=18,
                  scaleup_topology="NVLink 5, NVLink Switch trays all-to-all", scaleup_chips=72,
                  network_gb_per_s=400 * _GBIT, host_gb_per_s=900 / 2 / 2, chips_per_host=4),
    "v5p": Chip("TPU v5p", "tpu", bf16_tflops=459, fp8_tflops=459,
                hbm_gib=95, hbm_gb_per_s=2765,
                scaleup_gb_per_s=1200 / 2, scaleup_links=6,
                scaleup_topology="ICI 3D torus", scaleup_chips=6144,
                network_gb_per_s=50 * _GBIT, host_gb_per_s=15, chips_per_host=4),
    "v6e": Chip("TPU v6e (Trillium)", "tpu", bf16_tflops=918, fp8_tflops=918,
                hbm_gib=32, hbm_gb_per_s=1638,
                scaleup_gb_per_s=800 / 2, scaleup_links=4,
                scaleup_topology="ICI 2D torus", scaleup_chips=256,
                network_gb_per_s=100 * _GBIT, host_gb_per_s=32, chips_per_host=8),
    "ironwood": Chip("TPU7x (Ironwood)", "tpu", bf16_tflops=2307, fp8_tflops=4614,
                     hbm_gib=192, hbm_gb_per_s=7380,
                     scaleup_gb_per_s=1200 / 2, scaleup_links=6,
                     scaleup_topology="ICI 3D torus", scaleup_chips=9216,
                     network_gb_per_s=100 * _GBIT, host_gb_per_s=32, chips_per_host=4,
                     devices_per_chip=2),
}

# Where each figure comes from (docs/performance.md gives the sections and what is unconfirmed).
SOURCES = {
    "h100": ("NVIDIA H100 Tensor Core GPU datasheet (SXM column; sparse figures halved)",
             "nvidia-smi memory.total of an H100 80GB HBM3: 81559 MiB",
             "NVIDIA HGX AI Factory reference architecture: 400 Gb/s per GPU"),
    "h200": ("NVIDIA H200 Tensor Core GPU datasheet (SXM column; sparse figures halved)",
             "nvidia-smi memory.total of an H200: 143771 MiB",
             "NVIDIA HGX AI Factory reference architecture: 400 Gb/s per GPU"),
    "b200": ("NVIDIA DGX B200 datasheet (8 GPUs: memory, bandwidth, NVLink, ConnectX-7)",
             "NVIDIA Blackwell architecture technical brief (HGX B200 peaks, sparse halved)",
             "nvidia-smi memory.total of a B200: 183359 MiB",
             "NVIDIA HGX AI Factory reference architecture: 400 Gb/s per GPU"),
    "gb200": ("NVIDIA GB200 NVL72 product page (72-GPU totals divided by 72, sparse halved)",
              "nvidia-smi memory.total of a GB200: 189471 MiB",
              "NVIDIA multi-node NVLink tuning guide (compute tray: 4 GPUs, ConnectX-7)"),
    "v5p": ("Google Cloud TPU docs, TPU v5p, System architecture table",
            "How to Scale Your Model (jax-ml scaling book), part 2: ICI links, PCIe"),
    "v6e": ("Google Cloud TPU docs, TPU v6e, System architecture table",
            "Google Cloud TPU docs, TPU7x (Ironwood), comparison table (FP8, DCN)",
            "How to Scale Your Model (jax-ml scaling book), part 2: PCIe 32 GB/s"),
    "ironwood": ("Google Cloud TPU docs, TPU7x (Ironwood), System architecture table",
                 "Google Cloud TPU docs, TPU7x (Ironwood), Dual-chiplet architecture"),
}


def target(name: str) -> Chip:
    """The chip `name` names (any case); a one-line ConfigError naming the allowed ones."""
    chip = TARGETS.get(name.strip().lower())
    if chip is None:
        raise ConfigError(f"--target={name!r}: unknown chip; allowed: {', '.join(TARGETS)}")
    return chip
