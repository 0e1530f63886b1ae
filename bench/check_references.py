"""Check this project against the reference code itself: snapshots written by NVlabs/edm, NVlabs/edm2 and the official
Patch Diffusion code load here and give the same outputs, and EDM's sampler gives the same images for the same seeds.

The references run from their own checkouts (kept outside version control, e.g. in .baselines/), in subprocesses
with the checkout on PYTHONPATH: REFERENCE_SCRIPT builds tiny networks with their classes, pickles them as their
training loops do (dict(ema, loss_fn, augment_pipe, dataset_kwargs)), records outputs for fixed inputs and, for EDM,
samples with its generate.py's edm_sampler and StackedRandomGenerator as its main() calls them. This process then
loads every pickle with training.snapshot.load_network (no code from the file runs) and compares.

EDM2's networks (bench/edm2_cases.py) get deterministic weights instead of random ones; its script pickles them as
EDM2's training loop does (EasyDict(encoder, dataset_kwargs, loss_fn, ema)) and records the outputs in eval mode, in
training mode (the first call, where forced weight normalisation rewrites the weights) and in eval mode after it.
--edm2-data writes those inputs, outputs and state-dict layouts for tests/test_networks_edm2.py.

  python bench/check_references.py --edm=.baselines/edm --official=.baselines/patch-diffusion --edm2=.baselines/edm2 \
      --json=bench-out/references.json --edm2-data=tests/data/edm2-reference.pt
"""

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import edm2_cases  # noqa: E402
from bench.common import write_json  # noqa: E402
from training.sampler import generate_images  # noqa: E402
from training.snapshot import load_network  # noqa: E402

TINY = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
              channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
ADM = dict(model_type='DhariwalUNet')
# name: (class name, constructor arguments, coordinate channels the forward call takes)
EDM_CASES = {
    'EDMPrecond-ddpmpp-cond': ('EDMPrecond', dict(TINY, img_channels=3, label_dim=3, **DDPMPP), 0),
    'EDMPrecond-ncsnpp': ('EDMPrecond', dict(TINY, img_channels=3, **NCSNPP), 0),
    'EDMPrecond-adm-cond': ('EDMPrecond', dict(TINY, img_channels=3, label_dim=3, **ADM), 0),
    'VPPrecond-ddpmpp': ('VPPrecond', dict(TINY, img_channels=3, **DDPMPP), 0),
    'VEPrecond-ncsnpp': ('VEPrecond', dict(TINY, img_channels=3, **NCSNPP), 0),
    'iDDPMPrecond-adm': ('iDDPMPrecond', dict(TINY, img_channels=3, **ADM), 0),
}
OFFICIAL_CASES = {  # the official training loop passes img_channels = image channels + 2 and out_channels
    'Patch_EDMPrecond-ddpmpp': ('Patch_EDMPrecond', dict(TINY, img_channels=5, out_channels=3, **DDPMPP), 2),
    'Patch_EDMPrecond-adm-cond': ('Patch_EDMPrecond', dict(TINY, img_channels=5, out_channels=3, label_dim=3, **ADM), 2),
}
SEEDS = [0, 1, 2, 7]
SAMPLING = {  # name: (network case, sampler settings, class)
    'deterministic': ('EDMPrecond-ddpmpp-cond', dict(num_steps=8), None),
    'always-churn': ('EDMPrecond-ddpmpp-cond', dict(num_steps=8, S_churn=40, S_noise=1.003), None),
    'limited-churn': ('EDMPrecond-adm-cond', dict(num_steps=8, S_churn=40, S_min=0.1, S_max=5, S_noise=1.003), None),
    'class-and-churn': ('EDMPrecond-ddpmpp-cond', dict(num_steps=8, S_churn=40, S_min=0.1, S_max=5), 1),
    'vp-deterministic': ('VPPrecond-ddpmpp', dict(num_steps=8), None),
    'iddpm-deterministic': ('iDDPMPrecond-adm', dict(num_steps=8), None),
}

REFERENCE_SCRIPT = r'''
import json, pickle, sys
import torch
import dnnlib
from training import networks
outdir, kind, cases, sampling, seeds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
if kind == 'edm':
    from training.loss import EDMLoss as Loss
else:
    from training.patch_loss import Patch_EDMLoss as Loss
nets = {}
for name, (class_name, kwargs, pos) in cases.items():
    torch.manual_seed(0)
    net = getattr(networks, class_name)(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move the zero-initialised output layers away from zero
    net.eval().requires_grad_(False)
    nets[name] = net
    data = dict(ema=net, loss_fn=Loss(), augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip'))
    with open(f'{outdir}/{name}.pkl', 'wb') as f:
        pickle.dump(data, f)
    g = torch.Generator().manual_seed(1)
    channels = net.img_channels - pos
    x = torch.randn([3, channels, 16, 16], generator=g)
    x_pos = torch.rand([3, pos, 16, 16], generator=g) * 2 - 1
    sigma = torch.tensor([0.05, 0.7, 6.0])
    labels = torch.eye(3) if net.label_dim else None
    with torch.no_grad():
        out = net(x, sigma, x_pos, labels) if pos else net(x, sigma, labels)
    torch.save(dict(x=x, x_pos=x_pos if pos else None, sigma=sigma, class_labels=labels, out=out), f'{outdir}/{name}-io.pt')
if sampling:
    from generate import StackedRandomGenerator, edm_sampler
    device = torch.device('cpu')
    for name, (case, settings, class_idx) in sampling.items():
        net = nets[case]
        rnd = StackedRandomGenerator(device, seeds)
        latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = None
        if net.label_dim:
            class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
        with torch.no_grad():
            images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, **settings)
        torch.save((images * 127.5 + 128).clip(0, 255).to(torch.uint8), f'{outdir}/sample-{name}.pt')
'''

EDM2_SCRIPT = r'''
import copy, pickle, sys
import torch
import dnnlib
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder
from training.networks_edm2 import Precond
from training.training_loop import EDM2Loss
outdir = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import edm2_cases
for name, (kwargs, encoder, dtype) in edm2_cases.CASES.items():
    net = edm2_cases.fill_deterministic(Precond(**kwargs)).eval().requires_grad_(False)
    encoder = StandardRGBEncoder() if encoder == 'rgb' else StabilityVAEEncoder(**edm2_cases.VAE_ENCODER)
    ema = copy.deepcopy(net).to(getattr(torch, dtype))
    data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip'),
                           loss_fn=EDM2Loss(), ema=ema)
    with open(f'{outdir}/{name}.pkl', 'wb') as f:
        pickle.dump(data, f)
    io = edm2_cases.inputs(name)
    out = dict(io, kwargs=kwargs, layout=[(k, list(v.shape)) for k, v in net.state_dict().items()])
    with torch.no_grad():  # the pickled EMA as it is, float16 weights and all
        out['stored_dtype_eval'] = ema(io['x'], io['sigma'], class_labels=io['class_labels'], return_logvar=True)
    out.update(edm2_cases.outputs(net, io))
    torch.save(out, f'{outdir}/{name}-io.pt')
'''


def git_commit(checkout: str) -> str:
    """The commit a checkout is at, or 'unknown'."""
    proc = subprocess.run(['git', '-C', checkout, 'rev-parse', 'HEAD'], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else 'unknown'


def run_reference(kind: str, checkout: str, outdir: str, script: str, args: List[str]) -> None:
    """Run `script` with `args` after the output folder in the reference's checkout; its pickles and outputs go to outdir."""
    os.makedirs(outdir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    proc = subprocess.run([sys.executable, '-c', script, os.path.abspath(outdir), *args], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f'the {kind} reference in {checkout} failed:\n{proc.stderr[-3000:]}')


def compare_networks(outdir: str, cases: Dict) -> List[Dict]:
    """Each pickle loaded here: the largest difference of its outputs from the reference's on the same inputs, absolute
    and relative to the largest output (VP and VE outputs scale with sigma)."""
    rows = []
    for name in cases:
        net = load_network(os.path.join(outdir, f'{name}.pkl'))
        io = torch.load(os.path.join(outdir, f'{name}-io.pt'))
        with torch.no_grad():
            out = net(io['x'], io['sigma'], io['x_pos'], io['class_labels'])
        diff = float((out - io['out']).abs().max())
        rows.append(dict(case=name, loaded_as=type(net).__name__, pos_channels=net.pos_channels, max_abs_diff=diff,
                         max_rel_diff=diff / float(io['out'].abs().max())))
    return rows


def compare_edm2(outdir: str) -> List[Dict]:
    """Each EDM2 pickle loaded here: its state-dict layout against EDM2's, and the largest differences of D and logvar
    from EDM2's in every mode of edm2_cases.outputs (absolute, and relative to the largest value)."""
    rows = []
    for name in edm2_cases.CASES:
        net = load_network(os.path.join(outdir, f'{name}.pkl'))  # in the pickle's dtype, as EDM2 samples it
        io = torch.load(os.path.join(outdir, f'{name}-io.pt'))
        layout = [(k, list(v.shape)) for k, v in net.state_dict().items()]
        with torch.no_grad():
            as_stored = net(io['x'], io['sigma'], class_labels=io['class_labels'], return_logvar=True)
        ours = edm2_cases.outputs(net.float(), io)  # EDM2's outputs in every mode are of its float32 network
        for mode, (D, logvar) in ours.items():
            diff = max(float((D - io[mode][0]).abs().max()), float((logvar - io[mode][1]).abs().max()))
            scale = max(float(io[mode][0].abs().max()), float(io[mode][1].abs().max()))
            rows.append(dict(case=f'{name} ({mode})', loaded_as=type(net).__name__, pos_channels=net.pos_channels,
                             max_abs_diff=diff, max_rel_diff=diff / scale if layout == io['layout'] else float('inf'),
                             layout_equal=layout == io['layout'], latent=net.latent,
                             vs_stored_dtype=float((as_stored[0] - io['stored_dtype_eval'][0]).abs().max())))
    return rows


def write_edm2_data(outdir: str, path: str, commit: str) -> None:
    """The EDM2 cases' arguments, state-dict layouts, inputs and EDM2's outputs, for tests/test_networks_edm2.py."""
    keep = ('kwargs', 'layout', 'x', 'sigma', 'class_labels', *edm2_cases.MODES)
    cases = {}
    for name in edm2_cases.CASES:
        io = torch.load(os.path.join(outdir, f'{name}-io.pt'))
        cases[name] = {key: io[key] for key in keep}
    torch.save(dict(edm2_commit=commit, torch=str(torch.__version__), cases=cases), path)


def compare_sampling(outdir: str) -> List[Dict]:
    """Each sampling mode run here with the loaded network and the same seeds: uint8 values that differ from EDM's."""
    rows = []
    for name, (case, settings, class_idx) in SAMPLING.items():
        net = load_network(os.path.join(outdir, f'{case}.pkl'))
        with torch.no_grad():
            ours = generate_images(net, SEEDS, torch.device('cpu'), class_idx=class_idx, **settings)
        theirs = torch.load(os.path.join(outdir, f'sample-{name}.pt'))
        rows.append(dict(mode=name, network=case, settings=settings, class_idx=class_idx, values=theirs.numel(),
                         differing=int((ours != theirs).sum())))
    return rows


def check_edm2(checkout: str, outdir: str, data_path: Optional[str], commits: Dict) -> List[Dict]:
    """Run EDM2_SCRIPT in EDM2's checkout, compare, and write the test data if asked."""
    commits['edm2'] = git_commit(checkout)
    print(f'edm2: {checkout} at {commits["edm2"]}', flush=True)
    run_reference('edm2', checkout, outdir, EDM2_SCRIPT, [os.path.join(ROOT, 'bench')])
    rows = [dict(row, reference='edm2') for row in compare_edm2(outdir)]
    if data_path:
        write_edm2_data(outdir, data_path, commits['edm2'])
        print(f'wrote {data_path}')
    return rows


@click.command()
@click.option('--edm', 'edm_dir', help='Checkout of NVlabs/edm', metavar='DIR')
@click.option('--official', 'official_dir', help='Checkout of the official Patch Diffusion code', metavar='DIR')
@click.option('--edm2', 'edm2_dir', help='Checkout of NVlabs/edm2', metavar='DIR')
@click.option('--edm2-data', 'edm2_data', help='With --edm2: write the EDM2 outputs for the tests here', metavar='PATH')
@click.option('--outdir', help='Where the references write their pickles', metavar='DIR', default='bench-out/references', show_default=True)
@click.option('--tolerance', help='Largest network-output difference, relative to the largest output, that passes', metavar='FLOAT',
              type=float, default=2e-6, show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(edm_dir: Optional[str], official_dir: Optional[str], edm2_dir: Optional[str], edm2_data: Optional[str], outdir: str,
         tolerance: float, json_path: Optional[str]) -> None:
    """Load the references' own snapshots and compare outputs and samples; exits 1 if anything differs."""
    if not edm_dir and not official_dir and not edm2_dir:
        raise click.UsageError('give --edm, --official, --edm2 or several')
    if edm2_data and not edm2_dir:
        raise click.UsageError('--edm2-data needs --edm2')
    results = dict(torch=torch.__version__, tolerance=tolerance, networks=[], sampling=[], commits={})
    for kind, checkout, cases, sampling in [('edm', edm_dir, EDM_CASES, SAMPLING), ('official', official_dir, OFFICIAL_CASES, {})]:
        if not checkout:
            continue
        results['commits'][kind] = git_commit(checkout)
        print(f'{kind}: {checkout} at {results["commits"][kind]}', flush=True)
        run_reference(kind, checkout, os.path.join(outdir, kind), REFERENCE_SCRIPT,
                      [kind, json.dumps(cases), json.dumps(sampling), json.dumps(SEEDS)])
        results['networks'] += [dict(row, reference=kind) for row in compare_networks(os.path.join(outdir, kind), cases)]
        if sampling:
            results['sampling'] += compare_sampling(os.path.join(outdir, kind))
    if edm2_dir:
        results['networks'] += check_edm2(edm2_dir, os.path.join(outdir, 'edm2'), edm2_data, results['commits'])
    print('\n| reference | snapshot | loaded as | pos_channels | max abs output difference | relative |\n'
          '| --- | --- | --- | --- | --- | --- |')
    for row in results['networks']:
        print(f'| {row["reference"]} | {row["case"]} | {row["loaded_as"]} | {row["pos_channels"]} | {row["max_abs_diff"]:.2e} | '
              f'{row["max_rel_diff"]:.2e} |')
    if results['sampling']:
        print(f'\n| sampling mode (EDM, seeds {",".join(map(str, SEEDS))}) | network | differing uint8 values |\n| --- | --- | --- |')
        for row in results['sampling']:
            print(f'| {row["mode"]} | {row["network"]} | {row["differing"]} of {row["values"]} |')
    if json_path:
        write_json(json_path, results)
    failed = [row for row in results['networks'] if not row['max_rel_diff'] <= tolerance] + \
             [row for row in results['sampling'] if row['differing']]
    if failed:
        raise click.ClickException(f'{len(failed)} check(s) differ from the reference')


if __name__ == '__main__':
    main()
