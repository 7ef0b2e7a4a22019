"""
metrics.json, key by key: what measure.py writes for each checkpoint it measures, and what summary.md,
the reports over many runs (reports.py) and the docs read from it. metrics.py says how each number is
computed; this table says where it is written.

A key in braces stands for several ({peak,final}_ratio: peak_ratio and final_ratio),
<stream> for every stream the model carries (h; D and C; h0, h1 and their sum h0+h1), <where> for
"last" (the last sublayer) and "peak" (the peak sublayer, when it is another), [] for every entry of a
list. A tag says when a key is written: [ledger] for Ledger arms only; [attn_bias], [sigmoid], [gated]
for that attention kind only; [skipped] when no intervention could run; [run dir] when the input was a
run directory; [checkpoint] for this repo's checkpoints only, [pretrained] for a pretrained model only
(pretrained.py: a hub id, a folder or a .gguf file). Per sublayer lists run over model.sublayer_names; per layer and head lists are
[layer][head]. The per-snapshot files of --trajectory leave out label, out_dir and notes.
tests/test_metrics_json.py checks that measure.py writes exactly these keys.

key                                                 meaning
checkpoint, run_dir                                 [checkpoint] the measured file and its folder (absolute paths)
model                                               [pretrained] the hub id, folder or .gguf file measured
out_dir                                             where this file and the figures were written
label                                               the arm's row in summary.md (with its run folder when an arm
                                                    repeats)
arch, attention                                     the arm (a pretrained model: transformers' model_type), attention kind
format, iter_num                                    [checkpoint] the checkpoint's format and step
val_loss_recorded                                   [checkpoint] the val loss train.py recorded in the checkpoint
selection.{checkpoint,match_loss,distance}          [checkpoint] which checkpoint: final, matched_loss, as_given or
                                                    trajectory; the loss matched, and how far the recorded loss is
selection.auto                                      [run dir] whether the matched loss was --match_loss=auto
dataset, data_dir                                   [checkpoint] the data the windows come from
text.{source,bos,bos_token,position_0}              [pretrained] the text the windows come from; whether position 0 is
                                                    the BOS token (which one) or ordinary text
train_seed, optimizer                               [checkpoint] from train_config, for grouping runs into seeds
trained_by                                          [checkpoint] train.py's record of each stretch of training
train_config                                        [checkpoint] the checkpoint's training settings, as saved
model_config                                        ledger.GPTConfig as saved (pretrained.PretrainedConfig)
settings                                            MeasureConfig's fields; seq_len, device, align_windows resolved
sublayer_names                                      "0.attn", "0.mlp", ...: the sublayer outputs, in order
measured_val_loss                                   val loss on the measured windows, the baseline of every Δloss
plain_forward_loss                                  [pretrained] the same from a forward pass without hooks
decoded_stream                                      the stream the head reads: h, C, or h0+h1
sun_rule                                            Sun et al.'s rule for a massive entry, in words (their median: of
                                                    a window's whole sublayer output)
figures                                             the PNG files written beside this file
timing.{tokens,seconds,tokens_per_s}                tokens measured and the wall time of the whole measurement
timing.{statistics_s,dominant_profile_s,interventions_s,quantization_s,figures_s}
                                                    the wall time of each pass
timing.ledger_streams_s                             [checkpoint] the wall time of the Ledger pass
timing.{load_s,plain_forward_s,statistics_overhead}
                                                    [pretrained] loading; a forward pass without hooks over the same
                                                    windows; the statistics pass's time over it
notes                                               summary.md's plain-words lines about this run

streams.<stream>.dominant_dim                       the dimension with the largest mean |x| summed over depth
streams.<stream>.{persistence,top_dim_per_sublayer}
                                                    the fraction of sublayers whose top dimension is the dominant one;
                                                    the top dim of each
streams.<stream>.emergence_sublayer                 the first full-norm sublayer whose top dim is the dominant (or null)
streams.<stream>.eligible_per_sublayer              stream norm >= 25% of the final norm: only these can be the peak
streams.<stream>.{peak_sublayer,peak_sublayer_name}
                                                    the eligible sublayer with the largest ratio
streams.<stream>.{peak_ratio,final_ratio,ratio_per_sublayer}
                                                    top dim / median dim of mean |x|: at the peak, last, each sublayer
streams.<stream>.{peak_pos0_ratio,final_pos0_ratio,pos0_ratio_per_sublayer}
                                                    the dominant dim / the median dim, of mean |x| at position 0
streams.<stream>.start_token_concentration_{peak,final,per_sublayer}
                                                    the dominant dim's mean |x| at position 0 / at positions 1..T-1
streams.<stream>.dominant_mean_abs_{pos0,rest}_per_sublayer
                                                    the dominant dim's mean |x| at position 0, and at positions 1..T-1
streams.<stream>.top5_dims_at_peak                  [dim, mean |x|] of the five largest dimensions at the peak sublayer
streams.<stream>.mean_norm_{per_sublayer,pos0_per_sublayer,later_per_sublayer}
                                                    mean token L2 norm: all positions, position 0, positions 1..T-1
streams.<stream>.layer_{top1,top2,top3,median}_per_sublayer
                                                    Sun et al.'s Table 1: a window's 1st, 2nd, 3rd largest and median
                                                    |x| over the sublayer's whole output (T x D entries), mean over
                                                    windows
streams.<stream>.{top1_over_layer_median_per_sublayer,peak_top1_over_layer_median}
                                                    layer_top1 / layer_median (the ratio of the two means): each
                                                    sublayer, and at the peak sublayer
streams.<stream>.kurtosis_{per_sublayer,peak,final}
                                                    mean excess kurtosis over a token's dimensions (0: Gaussian)
streams.<stream>.token_max_median_ratio_{mean,max}_per_sublayer
                                                    a token's largest |x| over its own (per-token) median |x|: mean
                                                    and max over tokens
streams.<stream>.max_abs_per_sublayer               the largest |x| anywhere
streams.<stream>.sun_massive_count_{per_sublayer,total,pos0}
                                                    Sun et al.'s massive entries, |x| > 100 and >= 1000x the window's
                                                    layer-wide median (sun_rule): per sublayer, in all, at position 0
streams.<stream>.per_token_median_massive_count_{per_sublayer,total,pos0}
                                                    the same over each token's own median instead, which a token
                                                    whose whole vector grows (position 0) raises with its outlier
streams.<stream>.residual_peak.{per_sublayer,max,max_sublayer,max_sublayer_name,final}
                                                    position 0's L2 norm / the mean at positions 1..T-1 (Guo et al.);
                                                    max over eligible sublayers
streams.<stream>.released_definitions.{peak_ratio,peak_sublayer,peak_sublayer_name}
                                                    the released code's peak ratio: the max over all sublayers
streams.<stream>.released_definitions.{start_token_concentration,start_token_concentration_per_sublayer}
                                                    the released code's concentration: position 0 / all positions
streams.<stream>.released_definitions.{concentration_sublayer,concentration_sublayer_name}
                                                    ... taken where the dominant dim's mean |x| is largest
streams.<stream>.released_definitions.kurtosis_max  the released code's kurtosis: the max over sublayers
streams.<stream>.normalized.definition              the normalisation, in words: x / rms(x) per token
streams.<stream>.normalized.{peak_ratio,ratio_per_sublayer,peak_pos0_ratio,pos0_ratio_per_sublayer}
                                                    the ratios after it, at the raw numbers' peak sublayer and dim
streams.<stream>.normalized.start_token_concentration_{peak,final,per_sublayer}
                                                    the concentration after it
streams.<stream>.normalized.released_start_token_concentration
                                                    the released code's concentration after it
streams.<stream>.normalized.residual_peak.{per_sublayer,max,final}
                                                    the residual peak after it (~1 by construction)

top_tokens.<where>.{dim,sublayer,sublayer_name,pos0_mean_abs}
                                                    the decoded stream's dominant dim, where read, its mean |x| at pos 0
top_tokens.<where>.tokens[].{id,text,delimiter,mean_abs,count,ratio_to_pos0}
                                                    the tokens where it is largest off position 0: id, repr of the text,
                                                    whether a delimiter, mean |x|, count, mean |x| / position 0's
top_tokens.<where>.largest_delimiter                null when no delimiter is among the tokens seen often enough
top_tokens.<where>.largest_delimiter.{id,text,delimiter,mean_abs,count,ratio_to_pos0}
                                                    the same for the delimiter where it is largest
top_tokens.<where>.{delimiter_shares_feature,max_ratio_to_pos0,verdict}
                                                    whether a delimiter reaches half of position 0; the top token's
                                                    ratio; start-token specific, delimiter feature or not start-token
                                                    specific

extreme_tokens.attention                            the attention kind whose no-op is measured
extreme_tokens.{sink_per_layer_head,sink_max,sink_max_layer_head,sink_heads_over_half}
                                                    weight on position 0 (queries 1..T-1); the strongest; heads > 0.5
extreme_tokens.sink_uniform_baseline                the no-sink level: uniform attention's (sigmoid: the sink head's)
extreme_tokens.{value_drain_per_layer_head,value_drain_min,value_drain_min_layer_head,value_drain_at_sink_max}
                                                    |v| at position 0 / mean |v| later; most drained head; the sink's
extreme_tokens.{explicit_sink_per_layer_head,explicit_sink_heads_over_half}
                                                    [attn_bias] the weight on the learned key k', and the heads over 0.5
extreme_tokens.{explicit_sink_max,explicit_sink_max_layer_head}
                                                    [attn_bias] the strongest head on k', and its weight
extreme_tokens.{later_positions_per_layer_head,sink_at_explicit_sink_max}
                                                    [attn_bias] weight on positions 1..t; position 0's at the k' head
extreme_tokens.{explicit_sink_value_drain_per_layer_head,explicit_sink_value_drain_at_max}
                                                    [attn_bias] |v'| / the mean |v| of positions 1..T-1
extreme_tokens.{sink_uniform_baseline_per_layer_head,attention_mass_per_layer_head}
                                                    [sigmoid] each head's no-sink level, and its weight per query (mass)
extreme_tokens.{attention_mass_min,attention_mass_min_layer_head,attention_mass_at_sink_max}
                                                    [sigmoid] the lightest head, and the sink head's mass
extreme_tokens.{gate_pos0_per_layer_head,gate_later_per_layer_head,gate_pos0_mean,gate_later_mean}
                                                    [gated] the mean output gate at position 0 and at positions 1..T-1
extreme_tokens.{gate_later_min,gate_later_min_layer_head,gate_pos0_at_later_min,gate_later_at_sink_max}
                                                    [gated] the most closed head; the sink head's gate

interventions                                       null with --interventions=False
interventions.skipped                               [skipped] why none ran: the dominant dim tops no full-norm sublayer
interventions.{stream,position,dim,control_dim,from_sublayer,from_sublayer_name}
                                                    [checkpoint] what is set at position 0, from which sublayer on
interventions.baseline_loss                         the loss before
interventions.{zero_loss,zero_delta,mean_loss,mean_delta}
                                                    [checkpoint] val loss, and its change, with the dominant dim at 0 or
                                                    at its mean
interventions.{control_zero_loss,control_zero_delta,control_mean_loss,control_mean_delta}
                                                    [checkpoint] the same for a random control dim
interventions.{dims,position,written_at,writer_block_output,baseline_sink_per_layer}
                                                    [pretrained] the massive dims set at position 0; the first sublayer
                                                    that writes one, and its block's output; each layer's sink before
interventions.{zero,mean}_{every_block,where_written}_{loss,delta,sink_per_layer}
                                                    [pretrained] set to 0 or to their mean at every block's output, or
                                                    at the writing block's only: val loss, its change, each layer's sink
massive_dims[].{dim,written_at,written_at_name,written_by,erased_at,erased_at_name,erased_by}
                                                    [pretrained] the dominant dim and every other that tops position 0
                                                    at >= 100x the median somewhere: where its mean |x| at position 0
                                                    rises most (written) and falls most (erased; null: never), by how much
massive_dims[].mean_abs_pos0_per_sublayer           [pretrained] its mean |x| at position 0 after each sublayer
quantization                                        null with --quantization=False
quantization.{scheme,baseline_loss,w8_loss,w8_delta,w4_loss,w4_delta}
                                                    val loss and its change after weight-only 8- and 4-bit rounding

ledger_streams                                      null for an arm without Ledger's two streams
ledger_streams.{commit_gate_per_sublayer,commit_gate_mean}
                                                    [ledger] the mean commit gate of each sublayer, and over sublayers
ledger_streams.{C_over_D_norm_final,C_norm_pos0_final,C_norm_later_final}
                                                    [ledger] last sublayer: ‖C‖ / ‖D‖, and ‖C‖ at position 0 and later
ledger_streams.{C_dominant_dim,D_dominant_dim,C_carries_D_dim}
                                                    [ledger] whether C's dominant dim is D's
ledger_streams.loss_change_commit_logits_shifted.{-2,+2}
                                                    [ledger] Δ val loss with every commit logit shifted by -2 or +2
"""
import json
import math
import os

import numpy as np


def jsonable(obj):
    """Plain JSON: non-finite floats become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)
