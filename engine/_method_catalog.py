"""Every registered method's metadata, generated from the @register decorators: do not edit by hand.

Regenerate with `python scripts/update_catalog.py` after changing a decorator; tests/test_registry_catalog.py
fails while this file and the live registry differ.
"""
# ruff: noqa: E501

METHODS = [{'name': 'efficient_ad',
  'family': 'teacher_student',
  'localises': True,
  'supervision': 'none',
  'paper': 'Batzner et al., WACV 2024',
  'summary': 'Small patch description networks: a student imitates a distilled teacher (hard-feature loss) and an '
             'autoencoder catches logical anomalies; map = quantile-normalised discrepancies.',
  'faithful': True,
  'notes': "Follows the paper: PDN-S (`variant='medium'`: PDN-M) at its widths (128/256/256, M: 256/512/512), "
           'without padding as the reference implementations; the autoencoder (32-32-64-64-64-64 encoder, 8 '
           'bilinear/conv decoder stages, dropout 0.2); hard-feature loss (q = 0.999) plus the penalty mean(S(P)²) '
           "on an out-of-distribution image P per step; the autoencoder and the student's second half trained on "
           'colour-augmented images; teacher channel normalisation; 70 000 steps of batch 1, Adam lr 1e-4 (weight '
           'decay 1e-5), ×0.1 after 95 %; maps quantile-normalised (q_a = 0.9 -> 0, q_b = 0.995 -> 0.1) on a '
           'held-out 10 % of the training images, averaged, padded by 4 cells and resized; score = max of the map. '
           "Offline: the penalty images are scikit-image's bundled photographs (astronaut, coffee, moon, ...: "
           "resized to 2x, greyscale with p = 0.3, centre-cropped, as the paper's ImageNet images) instead of "
           'ImageNet; the teacher cannot be distilled from WideResNet-101 on ImageNet, so it is distilled on the '
           'training images from the bundled ImageNet EfficientNet-Lite0 (blocks.1+blocks.2, strides 4/8, 3x3 local '
           "average, resized to the PDN's grid, channel-standardised: 64 output channels instead of 384; 60 epochs, "
           'batch 8, lr 2e-3). fast (reduced): widths 16 (PDN and autoencoder), batch 2, at most 250 steps at lr '
           '3e-3 instead of 70 000 at 1e-4. Maps are padded by replicating the border cells (the reference code pads '
           'zeros: at 128 px that puts 44 % of the pixels at the normal q_a level).',
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': True,
  'presets': {'test': {'width': 16,
                       'ae_width': 16,
                       'batch_size': 2,
                       'teacher_batch_size': 2,
                       'teacher_epochs': 10,
                       'epochs': 10,
                       'max_steps': 250,
                       'lr': 0.003,
                       'teacher_lr': 0.01},
              'fast': {'width': 16,
                       'ae_width': 16,
                       'batch_size': 2,
                       'teacher_batch_size': 2,
                       'teacher_epochs': 10,
                       'epochs': 12,
                       'max_steps': 250,
                       'lr': 0.003,
                       'teacher_lr': 0.01},
              'quality': {}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.teacher_student.efficient_ad',
  'class_name': 'EfficientAD'},
 {'name': 'reverse_distillation',
  'family': 'teacher_student',
  'localises': True,
  'supervision': 'none',
  'paper': 'Deng & Li, CVPR 2022',
  'summary': "A decoder rebuilds a frozen encoder's multi-scale features from a compact one-class embedding; "
             'anomalies are what it cannot rebuild.',
  'faithful': True,
  'notes': 'Encoder is EfficientNet-Lite0 (stages blocks.1/2/4, strides 4/8/16) instead of WideResNet-50 layer1–3; '
           'OCBE and decoder are scaled to its channel widths, and each decoder stage ends in a linear 1x1 '
           "projection because EfficientNet stage outputs are signed (ResNet's are post-ReLU). Loss is the paper's "
           'per-position 1 − cos averaged over positions and summed over scales (the official code flattens each map '
           'into one vector instead). Adam-style optimiser (AdamW, lr 5e-3, betas 0.5/0.999 as in the paper) with '
           "early stopping, and far fewer epochs than the paper's 200 on CPU. Map: sum of upsampled 1 − cos maps, "
           "Gaussian σ = 4; image score: the map's maximum, as in the paper.",
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 15},
              'fast': {'max_steps': 60, 'epochs': 10},
              'quality': {'max_steps': 250, 'epochs': 100, 'patience': 15}},
  'reduced_presets': (),
  'module': 'engine.methods.teacher_student.reverse_distillation',
  'class_name': 'ReverseDistillation'},
 {'name': 'stfpm',
  'family': 'teacher_student',
  'localises': True,
  'supervision': 'none',
  'paper': 'Wang et al., BMVC 2021',
  'summary': "A student network trained from scratch to mimic a frozen pretrained teacher's feature pyramid; "
             'anomalies are where they disagree.',
  'faithful': True,
  'notes': 'Teacher and student are EfficientNet-Lite0 (stages blocks.1/2/4, strides 4/8/16) instead of ResNet-18 '
           "conv2_x–conv4_x. quality trains with the paper's optimiser (SGD, lr 0.4, momentum 0.9, weight decay "
           '1e-4) for up to 100 epochs (250 steps on CPU); fast and test use AdamW at lr 5e-3 for 60 steps (on mpdd '
           'metal_plate, fast: AdamW 0.966 image AUROC, SGD 0.971, seeds 1 and 2 0.963 and 0.982). Both stop early '
           'on a held-out slice of the normal images. Loss, product-of-scales anomaly map and max image score follow '
           'the paper; no smoothing by default.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 10, 'lr': 0.005},
              'fast': {'max_steps': 60, 'epochs': 10, 'lr': 0.005},
              'quality': {'max_steps': 250,
                          'epochs': 100,
                          'optimizer': 'sgd',
                          'lr': 0.4,
                          'weight_decay': 0.0001,
                          'grad_clip': None,
                          'patience': 15}},
  'reduced_presets': (),
  'module': 'engine.methods.teacher_student.stfpm',
  'class_name': 'STFPM'},
 {'name': 'uninformed_students',
  'family': 'teacher_student',
  'localises': True,
  'supervision': 'none',
  'paper': 'Bergmann et al., CVPR 2020 (Uninformed Students)',
  'summary': "An ensemble of students regresses a pretrained teacher's descriptors at several receptive fields; "
             'score = regression error + disagreement (predictive variance) between students.',
  'faithful': True,
  'notes': 'The pretrained EfficientNet-Lite0 itself is the teacher (stages blocks.1/2/4, strides 4/8/16, as three '
           'receptive fields) instead of a descriptor network distilled from ResNet-18 at p = 17/33/65 with the '
           "paper's metric-learning losses; the students are randomly initialised copies of the teacher's "
           'architecture (as the paper), each giving all three stages from one network rather than one network per '
           'receptive field. M = 3 students by default (test preset: 2). Teacher descriptors normalised per channel; '
           "students trained with the paper's MSE regression loss through the shared loop (AdamW); error and "
           'variance standardised with their mean and std over the training images (the paper uses a held-out '
           'validation set), summed, averaged over receptive fields, smoothed with σ=4 (the paper: none; sigma=0 '
           'turns it off); image score = map maximum. Far fewer steps than the paper on CPU (reduced).',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'n_students': 2, 'epochs': 8, 'lr': 0.005},
              'fast': {'n_students': 3, 'epochs': 10, 'max_steps': 60, 'lr': 0.005},
              'quality': {'n_students': 3, 'epochs': 60, 'max_steps': 300, 'lr': 0.002}},
  'reduced_presets': (),
  'module': 'engine.methods.teacher_student.uninformed_students',
  'class_name': 'UninformedStudents'},
 {'name': 'deep_svdd',
  'family': 'one_class',
  'localises': True,
  'supervision': 'none',
  'paper': 'Ruff et al., ICML 2018 (Deep SVDD), on pretrained patch features',
  'summary': 'Deep SVDD on pretrained patch features: a bias-free network pulls every normal patch towards one '
             'centre; the distance to it is the anomaly score.',
  'faithful': True,
  'notes': 'Follows Deep SVDD (one-class objective, fixed centre with the eps guard, bias-free network, unbounded '
           "activation) applied per patch to frozen EfficientNet-Lite0 features (blocks.2+blocks.4, PatchCore's 3x3 "
           "local average with zero padding, stride 8) through a 1x1-conv network, instead of the paper's LeNet-type "
           "CNN on whole images (a per-patch variant so that it gives maps). Deep SVDD's autoencoder pre-training is "
           'skipped (random init, seeded); the centre is the mean output of an initial forward pass with batch '
           "statistics. Map: squared distance per position, upsampled, Gaussian σ = 4; image score: the map's "
           'maximum (top_k > 0: mean of the top-k patch distances).',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 15},
              'fast': {'max_steps': 150, 'epochs': 30},
              'quality': {'max_steps': 600, 'epochs': 100, 'patience': 15}},
  'reduced_presets': (),
  'module': 'engine.methods.one_class.deep_svdd',
  'class_name': 'DeepSVDD'},
 {'name': 'fcdd',
  'family': 'one_class',
  'localises': True,
  'supervision': 'none',
  'paper': 'Liznerski et al., ICLR 2021',
  'summary': 'Fully convolutional one-class network: normal patches map near zero, synthetic outliers far; the '
             'pseudo-Huber output is itself the heatmap.',
  'faithful': True,
  'notes': 'Frozen ImageNet EfficientNet-Lite0 (blocks.2+blocks.4, stride 8, channel-standardised, no local '
           'averaging) instead of a partly fine-tuned VGG11; only a small 1x1 fully convolutional head is trained. '
           'Outliers: the shared DRAEM-style Perlin/texture anomalies (engine.components.synthetic_anomalies), '
           'generated once per fit (`outliers_per_image` per training image) instead of fresh confetti noise each '
           'batch; labelled anomalies passed to fit are added as extra outliers. Image-level (unsupervised) FCDD '
           'loss. Heatmap upsampling: bilinear + Gaussian blur (σ = `sigma`) rather than the transposed Gaussian '
           "kernel. Image score: mean of the heatmap as in the paper (`score='max'` also offered).",
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 15, 'outliers_per_image': 1},
              'fast': {'max_steps': 150, 'epochs': 30, 'outliers_per_image': 2},
              'quality': {'max_steps': 600, 'epochs': 100, 'outliers_per_image': 4}},
  'reduced_presets': (),
  'module': 'engine.methods.one_class.fcdd',
  'class_name': 'FCDD'},
 {'name': 'patch_svdd',
  'family': 'one_class',
  'localises': True,
  'supervision': 'none',
  'paper': 'Yi & Yoon, ACCV 2020 (Patch SVDD)',
  'summary': "Hierarchical patch encoders trained from pixels (SVDD' between nearby patches + a self-supervised "
             "relative-position task); a patch's score is the distance to its nearest normal patch.",
  'faithful': True,
  'notes': "Follows the paper and its authors' code: 32 px encoder (8 valid 3x3 convs, 32-64-128-128-64-32-32-D, D = "
           "64, LeakyReLU 0.1, tanh), 64 px hierarchical encoder over the four 32 px quadrants, SVDD' with jitter "
           'K/32, relative-position classifier on h1 − h2 (8 classes, offset 3K/4 + U[0, K/4), RGB shift and noise σ '
           '= 0.02), λ = 1, Adam lr 1e-4, 64 pairs of each kind per step, images at 256 px minus the training mean '
           'image, 1-NN L2 distances at K = 64 (stride 16) and K = 32 (stride 4), per-pixel mean over covering '
           "patches, maps multiplied, score = max. Differences: He initialisation of the encoders (PyTorch's "
           "default, as in the authors' code, made every patch code equal in short trainings); the authors' last "
           'classifier layer is a weight-normalised linear layer whose weight gets no gradient; here a plain linear '
           "layer. Training length: quality = the paper's 300 epochs of 100 pairs per image (3750 loop epochs of 8 "
           'images x 8 pairs); fast (reduced) works at 128 px with quarter-width encoders, 8 pairs of each kind per '
           'step, 200 steps at lr 1e-3, and at most 50 000 normal codes per patch size (a seeded random subset; more '
           'than 80 training images at 128 px); pixels of the right/bottom border that no patch covers score 0, as '
           "in the authors' code.",
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': False,
  'presets': {'test': {'size': 128,
                       'width': 0.25,
                       'batch_size': 4,
                       'pairs_per_image': 2,
                       'max_steps': 40,
                       'lr': 0.001},
              'fast': {'size': 128,
                       'width': 0.25,
                       'batch_size': 4,
                       'pairs_per_image': 2,
                       'max_steps': 200,
                       'lr': 0.001,
                       'max_bank': 50000},
              'quality': {}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.one_class.patch_svdd',
  'class_name': 'PatchSVDD'},
 {'name': 'cflow',
  'family': 'distribution',
  'localises': True,
  'supervision': 'none',
  'paper': 'Gudovskiy et al., WACV 2022 (CFLOW-AD)',
  'summary': 'One conditional normalizing flow per feature scale models each feature vector (fiber) given a 2D '
             'positional encoding of where it is; low likelihood = anomalous.',
  'faithful': True,
  'notes': 'EfficientNet-Lite0 blocks.1/2/4 stand in for WideResNet50 layers 1-3. Features are standardised per '
           'channel with training statistics (a fixed affine map; its constant log-det cancels in the map). Loss = '
           "per-dimension NLL (the reference code applies −logsigmoid to it). The map's normalisation subtracts each "
           "scale's maximum log-likelihood over the training fibers instead of over the test set, so an image's "
           'score does not depend on the other test images; map = Σ_scales (1 − p_l) upsampled, score = its max. '
           'Fiber batches are drawn from every position of every training image, one optimiser step per fiber batch; '
           "a fiber's coarser-scale partners are the fibers under the same spot. Log-scales soft-clamped with "
           '1.9·tanh(s/1.9); last subnet layer zero-initialised. Far fewer epochs than the paper.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 2, 'coupling_blocks': 4, 'cond_dim': 64},
              'fast': {'max_steps': 600, 'epochs': 1, 'coupling_blocks': 4, 'cond_dim': 64},
              'quality': {'max_steps': 2400, 'epochs': 4, 'coupling_blocks': 8, 'cond_dim': 128}},
  'reduced_presets': (),
  'module': 'engine.methods.distribution.cflow',
  'class_name': 'CFlow'},
 {'name': 'cs_flow',
  'family': 'distribution',
  'localises': True,
  'supervision': 'none',
  'paper': 'Rudolph et al., WACV 2022 (CS-Flow)',
  'summary': 'One fully convolutional normalizing flow over the feature maps of the image at three resolutions '
             'jointly; cross-scale couplings; score = mean ‖z‖² (high = unlikely).',
  'faithful': True,
  'notes': 'EfficientNet-Lite0 blocks.4 (112 channels, stride 16) of the image at full, 1/2 and 1/4 size stands in '
           "for EfficientNet-B5's 36th layer (304 channels) at 768/384/192 px. Features standardised per channel "
           'with the training mean and std (the paper feeds raw features). Parallel affine couplings with '
           'cross-scale convolution subnets (same-scale conv + upsampled coarser + strided finer), atan soft clamp '
           '3, zero-initialised output gains, 4 blocks as the paper; hidden channels 64/128 instead of 1024 and far '
           "fewer steps than the paper's 240 epochs on CPU (reduced). Score = mean of z² over all scales and "
           'positions as the paper; map = per-position mean over channels of z², upsampled and averaged over scales.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 15, 'hidden': 64, 'lr': 0.002},
              'fast': {'epochs': 20, 'max_steps': 150, 'hidden': 64, 'lr': 0.002},
              'quality': {'epochs': 60, 'max_steps': 500, 'hidden': 128, 'lr': 0.001}},
  'reduced_presets': (),
  'module': 'engine.methods.distribution.cs_flow',
  'class_name': 'CSFlow'},
 {'name': 'fastflow',
  'family': 'distribution',
  'localises': True,
  'supervision': 'none',
  'paper': 'Yu et al., arXiv 2021 (FastFlow)',
  'summary': 'A 2D normalizing flow per feature scale (conv subnets, 3×3 and 1×1 alternating) maps frozen backbone '
             'features to a standard normal; low likelihood = anomalous.',
  'faithful': True,
  'notes': 'EfficientNet-Lite0 blocks.1/2/4 (strides 4/8/16) stand in for ResNet18 stages 1-3. LayerNorm over (C, h, '
           'w) per image has no learned affine (a learned one lets training shrink the inputs and game the '
           "likelihood). Log-scales soft-clamped with 2·tanh(s/2) instead of FrEIA's atan; subnets' last layer "
           "zero-initialised (identity start). Loss = per-dimension NLL (the paper's NLL / C). Map: −mean over "
           'scales of upsampled exp(per-dimension log p), log p including the log-det, as in the paper; score = max '
           "of the map. Far fewer epochs than the paper's 500.",
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 6, 'flow_steps': 4},
              'fast': {'max_steps': 100, 'epochs': 16, 'flow_steps': 4},
              'quality': {'max_steps': 400, 'epochs': 40, 'flow_steps': 8}},
  'reduced_presets': (),
  'module': 'engine.methods.distribution.fastflow',
  'class_name': 'FastFlow'},
 {'name': 'cfa',
  'family': 'memory_bank',
  'localises': True,
  'supervision': 'none',
  'paper': 'Lee, Lee & Song, IEEE Access 2022 (CFA)',
  'summary': 'A trainable patch descriptor adapts pretrained features so normal patches fall inside small '
             'hyperspheres around a fixed memory bank (attraction) and away from hard negatives (repulsion).',
  'faithful': True,
  'notes': 'EfficientNet-Lite0 blocks.2+blocks.4 (strides 8/16, 3×3 locally averaged, 152 channels) stand in for '
           'WideResNet-50 layer1-3 (stride 4, 1792 channels): a stride-8 grid keeps the patch-to-bank distance '
           'matrix small on CPU. Descriptor (CoordConv 1×1), memory bank (mean of the untrained descriptor over the '
           'training images per position, optional k-means compression gamma_c), loss constants (K=3, J=3, r=1e-5, '
           "α=0.1, ν=1e-3), softmin score and σ=4 smoothing follow the paper's code. AdamW from the shared loop "
           "instead of AMSGrad. Presets train 5 epochs (at most 60 steps) instead of the paper's 30 (reduced): on "
           "the bundled sample, 30 epochs drifted lower (grass image AUROC 0.979 against 1.000 at 5); 'quality' adds "
           "blocks.1 for the paper's stride-4 grid.",
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 3},
              'fast': {'epochs': 5, 'max_steps': 60},
              'quality': {'epochs': 5, 'max_steps': 60, 'layers': ('blocks.1', 'blocks.2', 'blocks.4')}},
  'reduced_presets': (),
  'module': 'engine.methods.memory_bank.cfa',
  'class_name': 'CFA'},
 {'name': 'gcpf',
  'family': 'memory_bank',
  'localises': True,
  'supervision': 'none',
  'paper': 'Wan et al., IEEE Trans. Industrial Electronics 2022 (GCPF)',
  'summary': 'Pretrained features of each stage clustered into K independent Gaussians; score = Mahalanobis distance '
             'to the nearest cluster, averaged over stages.',
  'faithful': True,
  'notes': 'EfficientNet-Lite0 blocks.1/2/4 (strides 4/8/16) stand in for WideResNet-50 layer1-3. K=10 clusters per '
           "stage, k-means start and hard Gaussian reassignment with Ledoit–Wolf covariances as the paper's code; "
           'per-stage maps upsampled, averaged, blurred with σ=4, image score = map maximum. The reassignment stops '
           'when no feature changes cluster or after `iters` rounds (paper: centre/covariance shift below 0.1). When '
           'a stage has more than max_points training features the clusters are fitted on a seeded random subset of '
           'that many (max_points=None uses all).',
  'trained': False,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'iters': 5}, 'fast': {'iters': 10}, 'quality': {'iters': 30, 'max_points': None}},
  'reduced_presets': (),
  'module': 'engine.methods.memory_bank.gcpf',
  'class_name': 'GCPF'},
 {'name': 'padim',
  'family': 'memory_bank',
  'localises': True,
  'supervision': 'none',
  'paper': 'Defard et al., ICPR 2021',
  'summary': 'A Gaussian per patch position over multi-scale features; score = Mahalanobis distance.',
  'faithful': True,
  'notes': 'Three stages of EfficientNet-Lite0 (strides 4/8/16, 176 channels). EfficientNet-Lite0 has few enough '
           "channels that all are kept by default (n_features=None); the paper's random subset is available with "
           "n_features=d. Covariance as the paper: S + 0.01·I (shrinkage='ledoit_wolf' offers Ledoit–Wolf shrinkage, "
           'which scored lower on MPDD and the sample data).',
  'trained': False,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {},
  'reduced_presets': (),
  'module': 'engine.methods.memory_bank.padim',
  'class_name': 'PaDiM'},
 {'name': 'patchcore',
  'family': 'memory_bank',
  'localises': True,
  'supervision': 'none',
  'paper': 'Roth et al., CVPR 2022',
  'summary': 'Memory bank of locally aware mid-level patch features, thinned by a greedy coreset; score = distance '
             'to the nearest normal patch.',
  'faithful': True,
  'notes': 'Layers blocks.2+blocks.4 of EfficientNet-Lite0 (strides 8/16) stand in for WideResNet layer2+layer3. '
           "Locally aware features: 3x3 average with zero padding counted (pad='zero'), as the paper's code; "
           "pad='valid' averages border windows over real cells only. Coreset 1% by default (the paper reports 1%, "
           "10% and 25%; 'quality' uses 10%), always the paper's exact greedy selection over every training patch "
           '(engine.components.coreset). max_candidates=N is an opt-in shortcut for very large sets: the selection '
           'then runs over a seeded random subset of N patches, still keeping coreset_ratio of all patches.',
  'trained': False,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'fast': {'coreset_ratio': 0.01}, 'quality': {'coreset_ratio': 0.1}},
  'reduced_presets': (),
  'module': 'engine.methods.memory_bank.patchcore',
  'class_name': 'PatchCore'},
 {'name': 'spade',
  'family': 'memory_bank',
  'localises': True,
  'supervision': 'none',
  'paper': 'Cohen & Hoshen, arXiv 2020',
  'summary': 'kNN over whole-image features picks the closest normal images; pixel kNN against their feature '
             'pyramids localises.',
  'faithful': True,
  'notes': 'Image kNN on the globally pooled last stage (blocks.6); pixel gallery = feature maps of the k_gallery '
           "nearest normal images (paper: all K; 'quality' preset uses 50) at stride 8.",
  'trained': False,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'fast': {'k_gallery': 10}, 'quality': {'k_gallery': 50}},
  'reduced_presets': (),
  'module': 'engine.methods.memory_bank.spade',
  'class_name': 'SPADE'},
 {'name': 'autoencoder',
  'family': 'autoencoder',
  'localises': True,
  'supervision': 'none',
  'paper': 'Bergmann et al., VISAPP 2019 (SSIM autoencoder)',
  'summary': 'Convolutional autoencoder trained from scratch on random patches of normal images with the SSIM loss '
             '(or L2); anomalies are where the reconstruction is structurally dissimilar.',
  'faithful': True,
  'notes': 'Follows the paper: its Table 1 architecture (4x4/3x3 convs of 32-128 channels, a d = 100 latent vector, '
           "mirrored decoder, LeakyReLU 0.2, linear outputs), SSIM loss with an 11 px Gaussian window (`loss='l2'` "
           "is the paper's L2 variant), training on random 128 px patches (Adam lr 2e-4, weight decay 1e-5, batch "
           '128, 200 epochs of 10 000 patches in quality), residual map 1 − SSIM (or the squared error for L2) from '
           "128 px sliding windows (stride 32, overlapping maps averaged), image score = the map's maximum. Images "
           'are resized to `size` = 256 px (the MVTec AD evaluation zooms textures to 512 px). Colour images keep '
           "their 3 channels (the paper's woven textures were grey). fast (reduced): images at 128 px, 64 px windows "
           'at stride 16 (the same architecture, its last conv 4x4), half-width channels, 300 steps of 16 patches at '
           'lr 2e-3, and the map smoothed with a Gaussian of σ = 2 px (without it the max score is noisy: sample '
           'brick image AUROC 0.79 without, 0.93 with, test preset).',
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': False,
  'presets': {'test': {'size': 128,
                       'patch': 64,
                       'stride': 16,
                       'sigma': 2.0,
                       'width': 0.5,
                       'batch_size': 8,
                       'epochs': 400,
                       'max_steps': 150,
                       'lr': 0.002},
              'fast': {'size': 128,
                       'patch': 64,
                       'stride': 16,
                       'sigma': 2.0,
                       'width': 0.5,
                       'batch_size': 16,
                       'epochs': 400,
                       'max_steps': 300,
                       'lr': 0.002},
              'quality': {}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.autoencoder.autoencoder',
  'class_name': 'Autoencoder'},
 {'name': 'dfr',
  'family': 'autoencoder',
  'localises': True,
  'supervision': 'none',
  'paper': 'Shi, Yang & Qi, Neurocomputing 2021 (DFR)',
  'summary': 'Rebuilds multi-scale pretrained feature maps with a 1×1 convolutional autoencoder; anomalies are the '
             'cells whose features it cannot rebuild.',
  'faithful': True,
  'notes': 'EfficientNet-Lite0 (bundled ImageNet weights) stands in for VGG19 (offline): stages blocks.0/1/2/4 '
           '(strides 2–16, 192 channels) instead of relu1_1–relu4_4 (12 layers, strides 1–8). As the paper: each map '
           'is resized to the image size, averaged over non-overlapping 4×4 windows and stacked (regional features '
           'at stride 4); the latent width is the number of principal components keeping 90% of the variance of the '
           "first 10 training images' features; the autoencoder is the paper's 1×1-conv CAE with BatchNorm, trained "
           'with MSE; map = mean over channels of the squared error, upsampled. Differences: AdamW at lr 1e-3 with a '
           'step cap from the shared train loop instead of Adam 1e-4 for 150–700 epochs (reduced on CPU), early '
           'stopping on a held-out slice; Gaussian smoothing σ = `sigma` px (default 4, as PatchCore here; the paper '
           'has none); image score = max of the map.',
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 30, 'max_steps': 120},
              'fast': {'epochs': 100, 'max_steps': 300},
              'quality': {'epochs': 700, 'max_steps': 2000}},
  'reduced_presets': (),
  'module': 'engine.methods.autoencoder.dfr',
  'class_name': 'DFR'},
 {'name': 'draem',
  'family': 'autoencoder',
  'localises': True,
  'supervision': 'none',
  'paper': 'Zavrtanik et al., ICCV 2021 (DRAEM)',
  'summary': 'Learns to repair and segment synthetic defects pasted onto normal images: a reconstruction network '
             'plus a discriminative U-Net that compares the image with its repair.',
  'faithful': True,
  'notes': "Follows the paper and its authors' code: the reconstructive sub-network (encoder-decoder without skips, "
           'base width 128, bottleneck 1024 channels at 1/16) and the discriminative U-Net (base 64, six levels, 2 '
           'logits) on [image, reconstruction]; loss L2 + (1 − SSIM) (11 px window) + focal loss (γ = 2); '
           'Perlin-noise masks (2^0–2^5 cells per axis, rotated, thresholded at 0.5), opacity β ~ U(0, 0.8), half '
           'the images left clean, 30 % of the training images rotated by up to ±90°; Adam lr 1e-4, ×0.2 at 80 % and '
           '90 % of 700 epochs, batch 8, 256 px; map = softmax anomaly channel, score = max of the map '
           "average-pooled over 21×21. Anomaly source: scikit-image's bundled photographs (astronaut, coffee, moon, "
           '...; three random colour/contrast operations each) instead of the DTD texture download (offline); '
           "rotations reflect at the border (the authors' imgaug fills black). fast (reduced): 128 px, base widths "
           "8/8 instead of 128/64, 100 steps at lr 2e-3, pool 11 — the paper's 700 epochs at full width take days on "
           'a CPU.',
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': False,
  'presets': {'test': {'size': 128,
                       'rec_base': 4,
                       'disc_base': 4,
                       'epochs': 60,
                       'max_steps': 60,
                       'batch_size': 4,
                       'lr': 0.003,
                       'pool': 11},
              'fast': {'size': 128,
                       'rec_base': 8,
                       'disc_base': 8,
                       'epochs': 700,
                       'max_steps': 100,
                       'lr': 0.002,
                       'pool': 11},
              'quality': {}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.autoencoder.draem',
  'class_name': 'Draem'},
 {'name': 'memae',
  'family': 'autoencoder',
  'localises': True,
  'supervision': 'none',
  'paper': 'Gong et al., ICCV 2019 (MemAE)',
  'summary': 'Autoencoder whose latent is rebuilt from a learned memory of normal prototypes (sparse addressing); '
             'defects are rebuilt as normal content and show in the reconstruction error.',
  'faithful': True,
  'notes': "As the paper: every latent position is a query into M memory items (M = 500, the paper's CIFAR setting), "
           "softmax addressing, hard shrinkage with λ = 0.0025 (1.25/M, within the paper's 1/M–3/M) and L1 "
           'renormalisation, loss = MSE + α·mean addressing entropy with α = 0.0002. Addressing uses the dot product '
           "as the authors' released code (the paper writes cosine similarity). Encoder/decoder are this lab's small "
           'strided-conv nets (widths 16–64, latent 64 channels at size/16) trained from scratch at `size` px '
           "(default 128; maps upsampled) with seeded flips, AdamW with a step cap instead of the paper's schedule "
           '(reduced on CPU). Map = |x − x̂| averaged over channels, Gaussian σ = 2 px; score = mean of the top 1% '
           'of the map (the paper scores the whole-image error; `top_k=1` gives that).',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': False,
  'presets': {'test': {'epochs': 30},
              'fast': {'max_steps': 300, 'epochs': 60},
              'quality': {'max_steps': 1200, 'epochs': 300}},
  'reduced_presets': (),
  'module': 'engine.methods.autoencoder.memae',
  'class_name': 'MemAE'},
 {'name': 'skip_ae',
  'family': 'autoencoder',
  'localises': True,
  'supervision': 'none',
  'paper': 'Collin & De Vleeschouwer, ICPR 2020 (autoencoder with skip connections + Stain noise)',
  'summary': 'Autoencoder with skip connections (sharp rebuilds) trained to remove synthetic stains from normal '
             'images, so it repaints defects instead of copying them.',
  'faithful': True,
  'notes': 'As the paper: symmetric additive skip connections at every scale (AESc), 5×5 convolutions, width 16·2^i, '
           'BatchNorm + LeakyReLU; every training image gets one Stain (ellipse, semi-axes 1–12% of the image side, '
           'border of 20 points perturbed by ±10% and closed by a cubic, edges blurred with σ = 0.15·semi-axis, one '
           'grey level in 10–220 plus noise) and the loss is the MSE to the clean image. Differences: the border '
           'points move along the radius (a star-shaped blob) instead of in x and y; depth 5 at `size` = 128 px (the '
           'paper: depth 6 at 256, both a 4×4 bottleneck); AdamW at 2e-3 with a step cap instead of Adam at 0.01 for '
           "250 epochs (reduced on CPU); seeded flips. Map = |x − x̂| averaged over channels (the paper's residual), "
           'Gaussian σ = 2 px; score = mean of the top 1% of the map.',
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': False,
  'presets': {'test': {'epochs': 30},
              'fast': {'max_steps': 300, 'epochs': 60},
              'quality': {'max_steps': 1200, 'epochs': 250}},
  'reduced_presets': (),
  'module': 'engine.methods.autoencoder.skip_ae',
  'class_name': 'SkipConnectionAE'},
 {'name': 'vae',
  'family': 'autoencoder',
  'localises': True,
  'supervision': 'none',
  'paper': 'Kingma & Welling, ICLR 2014 (VAE); network of Bergmann et al., VISAPP 2019; scoring as in the survey',
  'summary': 'Variational autoencoder trained on normal images; score = −ELBO: reconstruction error plus how far the '
             'latent code is from the prior (KL).',
  'faithful': True,
  'notes': "Kingma & Welling's VAE (Gaussian latent, reparameterisation, loss = −ELBO with a fixed-variance Gaussian "
           "decoder: squared error summed over pixels + KL to N(0, I), β = 1) on the SSIM autoencoder's "
           'convolutional network (Bergmann et al. 2019, Table 1, d = 100; the VAE paper has no image network), '
           "whole images resized to `size` = 128 px, Adam lr 2e-4. Score = the image's −ELBO with x̂ decoded from μ "
           "(reconstruction error + the latent's KL deviation from the prior, as the survey describes); map = "
           'per-pixel squared error. The loss is divided by the pixel count for the optimiser (same minimiser). fast '
           '(reduced): half-width channels and a few hundred steps at lr 2e-3.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': False,
  'presets': {'test': {'width': 0.5, 'batch_size': 8, 'max_steps': 150, 'lr': 0.002},
              'fast': {'width': 0.5, 'batch_size': 16, 'max_steps': 300, 'lr': 0.002},
              'quality': {}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.autoencoder.vae',
  'class_name': 'VAE'},
 {'name': 'ganomaly',
  'family': 'gan',
  'localises': True,
  'supervision': 'none',
  'paper': 'Akçay et al., ACCV 2018',
  'summary': 'Encoder-decoder-encoder generator trained adversarially on normal images; score = distance between the '
             "image's latent code and the re-encoded reconstruction's.",
  'faithful': True,
  'notes': 'Follows the paper: DCGAN encoder-decoder-encoder and discriminator (4x4 convs from ngf = 64 channels '
           'doubling to a 4x4 map, nz = 100, BN, LeakyReLU 0.2 / ReLU, tanh output), losses w_adv = 1 (feature '
           "matching on D's last features), w_con = 50 (L1), w_enc = 1 (L2), D trained with BCE and re-initialised "
           "when its loss falls below 1e-5 (the authors' code), Adam lr 2e-4, β = (0.5, 0.999), batch 64, DCGAN "
           'initialisation; score = mean |G_E(x) − E(G(x))| (Eq. 8, L1), raw rather than min-max scaled over the '
           "test set (same ranking). Images are resized to `size` = 64 px. Training length: the paper's 15 epochs "
           'are over thousands of images; on the tens of images here quality trains up to 3000 steps. fast '
           '(reduced): ngf 16 and 300 steps. Additions outside the paper: the pixel map (smoothed |x − x̂|, the '
           "paper has none; weak on textures) and `score='reconstruction'`. Mode collapse and a runaway "
           'discriminator are reported in the run notes; all-equal or non-finite scores fail the run. Known '
           'weakness: on textures the latent score is near chance (the paper evaluates on objects).',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': False,
  'presets': {'test': {'ngf': 16, 'epochs': 60, 'max_steps': 120, 'batch_size': 8, 'lr': 0.002},
              'fast': {'ngf': 16, 'epochs': 300, 'max_steps': 300, 'batch_size': 16},
              'quality': {'epochs': 3000, 'max_steps': 3000}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.gan.ganomaly',
  'class_name': 'GANomaly'},
 {'name': 'uniad',
  'family': 'transformer',
  'localises': True,
  'supervision': 'none',
  'paper': 'You et al., NeurIPS 2022 (UniAD)',
  'summary': 'Transformer encoder-decoder with neighbour-masked attention and layer-wise learned queries '
             'reconstructs frozen patch features; map = per-position reconstruction error.',
  'faithful': True,
  'notes': "Follows the paper and its authors' code: features of four backbone stages (strides 2, 4, 8, 16) resized "
           'to the stride-16 token grid; feature jittering (scale 20, p = 1); a reconstruction transformer of 4 '
           'encoder and 4 decoder layers, width 256, 8 heads, feed-forward 1024, dropout 0.1, ReLU, post-norm, '
           'learned positions, layer-wise learned queries, Xavier initialisation; 7×7 neighbour masks in the encoder '
           'and in both decoder attentions; MSE loss; AdamW lr 1e-4 (weight decay 1e-4, gradient norm clipped at '
           '0.1), ×0.1 after 800 of 1000 epochs, batch 8; map = ‖f − f̂‖₂ per token upsampled bilinearly; score = '
           'max of the map average-pooled over 16×16 px (one token cell). Differences: the bundled ImageNet '
           "EfficientNet-Lite0 (blocks.0, .1, .2, .4: 16+24+40+112 = 192 channels) instead of EfficientNet-B4's "
           'stages (24+32+56+160 = 272), which needs a download (offline); features standardised per channel with '
           'training statistics (ours); the grid is `grid`×`grid` = 16 at 256 px (the paper: 14 at 224 px); finer '
           'stages are averaged over an odd window before resizing to the grid (the paper resizes bilinearly); '
           'single-class training. fast (reduced): 1 + 1 layers of width 128, 4 heads, feed-forward 512, at most 300 '
           'steps at lr 1e-3 instead of 1000 epochs at 1e-4.',
  'trained': True,
  'cpu_bf16': True,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 40,
                       'max_steps': 120,
                       'enc_layers': 1,
                       'dec_layers': 1,
                       'd_model': 64,
                       'heads': 2,
                       'ff_dim': 256,
                       'lr': 0.001},
              'fast': {'max_steps': 300,
                       'epochs': 60,
                       'enc_layers': 1,
                       'dec_layers': 1,
                       'd_model': 128,
                       'heads': 4,
                       'ff_dim': 512,
                       'lr': 0.001},
              'quality': {}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.transformer.patch_transformer',
  'class_name': 'UniAD'},
 {'name': 'cavga',
  'family': 'weakly_supervised',
  'localises': True,
  'supervision': 'weak',
  'paper': 'Venkataramanan et al., ECCV 2020',
  'summary': 'Convolutional adversarial VAE whose latent map carries Grad-CAM attention; a classifier on the latent '
             'learns from the labelled anomalies, and the complementary guided attention loss makes the normal class '
             'attend everywhere and the anomalous class nowhere on normal images.',
  'faithful': True,
  'notes': "CAVGA-Wu, the paper's weakly supervised variant: convolutional latent (VAE, reparameterised), decoder, "
           'discriminator on reconstructions, binary classifier on the latent, Grad-CAM attention on the latent, '
           "complementary guided attention loss on correctly classified normal images; score = the classifier's "
           "anomalous log-odds, map = 1 − the normal class's attention (CAVGA-Du's test map; the anomalous class's "
           "attention came out zero everywhere here, L_cga pushes it below Grad-CAM's ReLU), times the anomalous "
           "probability so maps compare across images. K = 0: the paper's unsupervised CAVGA-Du (attention expansion "
           "loss instead of a classifier) is not registered; adlab's cavga needs labelled anomalies and K = 0 is the "
           "same error as DevNet's (the expansion loss is implemented and tested). Differences: the encoder is "
           'frozen ImageNet EfficientNet-Lite0 (blocks.4, stride 16) plus a trainable conv head, not a fine-tuned '
           "ResNet-18; the decoder is the shared convolutional decoder and the discriminator GANomaly's DCGAN one; "
           'loss weights 1 for reconstruction (MSE), adversarial, per-pixel KL, classification and L_cga (ours); '
           'balanced batches with flip/rotation views of the anomalies (as DevNet); AdamW. fast (reduced): 8-times '
           'narrower decoder and discriminator, 300 steps.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 12, 'steps_per_epoch': 10, 'batch_size': 8, 'widths': (8, 16, 32, 64), 'ngf': 8},
              'fast': {'epochs': 20, 'steps_per_epoch': 15, 'batch_size': 8, 'widths': (8, 16, 32, 64), 'ngf': 8},
              'quality': {'epochs': 100, 'steps_per_epoch': 20, 'batch_size': 16}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.weakly_supervised.cavga',
  'class_name': 'CAVGA'},
 {'name': 'devnet',
  'family': 'weakly_supervised',
  'localises': True,
  'supervision': 'weak',
  'paper': 'Pang, Shen & van den Hengel, KDD 2019',
  'summary': 'Scoring network trained with the deviation loss: normal scores pulled to a N(0,1) reference, the few '
             'labelled anomalies pushed ≥ 5σ above it; top-k patch scores give the image score.',
  'faithful': True,
  'notes': "Image variant of DevNet as in the group's later image works (explainable DevNet 2021, DRA 2022): the "
           'scoring head (one hidden layer) runs on every position of frozen EfficientNet-Lite0 features '
           '(blocks.2+blocks.4, stride 8) instead of a fine-tuned ResNet, and the image score is the top-10% mean of '
           'patch scores (top-k MIL); the map is those patch scores, upsampled and smoothed, learned only from image '
           'labels (weak localisation). Deviation loss, N(0,1) prior with l=5000 reference scores per batch, margin '
           '5, balanced batches with flip/rotation augmentation of the anomalies as in the paper; AdamW instead of '
           'RMSprop; fixed number of batches per epoch as in the paper, no early stopping.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 20, 'steps_per_epoch': 10},
              'fast': {'epochs': 20, 'steps_per_epoch': 20},
              'quality': {'epochs': 50, 'steps_per_epoch': 20}},
  'reduced_presets': (),
  'module': 'engine.methods.weakly_supervised.devnet',
  'class_name': 'DevNet'},
 {'name': 'liac',
  'family': 'weakly_supervised',
  'localises': True,
  'supervision': 'weak',
  'paper': 'Wan, Gao & Li, IEEE TIM 2022',
  'summary': 'Classifier trained with the logit inducing loss (normal logits pulled to one value, the few labelled '
             'anomalies pushed past a margin, classes weighed equally) and an abnormality capturing module (distance '
             'to normal prototypes) that guides where it looks.',
  'faithful': False,
  'notes': "Only the paper's abstract was available here, so the logit inducing loss (LIS) and the abnormality "
           "capturing module (ACM) are our reading of it, not the paper's equations: LIS = ½·mean over normal images "
           'of (z + m)² + ½·mean over labelled anomalies of max(0, m − z)², m = 1, each class averaged on its own '
           '(the imbalance); ACM = distance of every feature position to the nearest of 16 k-means prototypes of '
           'normal features, standardised on the normal images, fed to the classifier with the features and used as '
           'softmax pooling weights for the patch logits. The classifier is a one-hidden-layer head on frozen '
           "EfficientNet-Lite0 features (blocks.2+blocks.4), not the paper's network. Batches: normal images with "
           'anomalies in their natural proportion (flip/rotation views count), at least one per batch. Score = image '
           'logit; map = patch logits, upsampled and smoothed.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 15, 'steps_per_epoch': 10},
              'fast': {'epochs': 20, 'steps_per_epoch': 20},
              'quality': {'epochs': 50, 'steps_per_epoch': 20}},
  'reduced_presets': (),
  'module': 'engine.methods.weakly_supervised.liac',
  'class_name': 'LIAC'},
 {'name': 'mixed_supervision',
  'family': 'weakly_supervised',
  'localises': True,
  'supervision': 'weak',
  'paper': 'Božič, Tabernik & Skočaj, Computers in Industry 2021',
  'summary': 'Segmentation sub-network + classification sub-network on top of it, trained with pixel masks where '
             'available and image labels for the rest; map = segmentation, score = classification.',
  'faithful': True,
  'notes': 'The paper trains its sub-networks from the image; here both read frozen EfficientNet-Lite0 features '
           "(blocks.2+blocks.4, stride 8 like the paper's output) to keep CPU training short, and the segmentation "
           'sub-network is smaller (1×1 then two 3×3 convs, 64 channels, instead of 11 convs up to 1024 channels and '
           'a 15×15 kernel: the backbone features already have a large receptive field). Kept from the paper: λ '
           'schedule (λ = 1 − epoch/epochs, δ = 0.01), distance-transform weighting (p = 2) of positive pixels on '
           'dilated masks, stop-gradient from classification into segmentation, classification on segmentation '
           'volume + output with global max/avg pooling, masks only for `n_masks` anomalies (default all). '
           'Differences: AdamW instead of SGD, balanced batches (as many labelled anomalies, with flip/rotation '
           'views, as normal images) instead of frequency sampling, a fixed number of batches per epoch. Without any '
           'mask the map is learnt from normal images only.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': True,
  'presets': {'test': {'epochs': 8, 'steps_per_epoch': 8, 'lr': 0.003},
              'fast': {'epochs': 20, 'steps_per_epoch': 15},
              'quality': {'epochs': 50, 'steps_per_epoch': 20}},
  'reduced_presets': (),
  'module': 'engine.methods.weakly_supervised.mixed_supervision',
  'class_name': 'MixedSupervision'},
 {'name': 'neural_batch_sampler',
  'family': 'weakly_supervised',
  'localises': True,
  'supervision': 'weak',
  'paper': 'Chu & Kitani, ECCV 2020',
  'summary': 'Autoencoders trained on patches that a reinforcement-learning policy picks, rewarded by how well a '
             'predictor separates anomalous from normal pixels by their loss profiles (their reconstruction losses '
             'during training); the predictor gives the map and the score.',
  'faithful': False,
  'notes': 'Follows what the stored text of the paper states (the abstract; the §3 passage on the sampler, known '
           'only as quoted in public notes): an autoencoder trained by SGD, a loss profile = the sequence of '
           'reconstruction losses during training, a predictor on the profiles of anomalous and non-anomalous '
           'regions, and an RL sampler choosing the sequence of training patches with reward R_pred1 = −(the '
           "predictor's loss), credited at the end of the sequence. Not faithful because the paper's full text was "
           "not found in any stored copy, so these are not from the paper: the autoencoder's architecture, patch and "
           "input size and optimiser; the profile's length and spacing; the sampler's state, actions, network and RL "
           'details (baseline, episode length, whether the autoencoder restarts per episode), any reward besides '
           "R_pred1; the predictor's architecture; the image score; training lengths; the reported numbers. Ours: 64 "
           'px images, a pool of 16×16 patches at stride 8 (quality: 128 px, 32×32 at stride 16), small conv '
           "autoencoder, one fresh autoencoder per episode; policy = MLP on each pool patch's (log loss, its fall "
           'since the episode began, episode fraction) with a softmax over the pool of normal patches; a profile of '
           '10 losses evenly spaced over the episode for every pixel, each loss the squared error averaged over the '
           '7×7 window around it (quality: 13×13); predictor = 3-layer conv net on the standardised log profiles, '
           'class-balanced pixel BCE; REINFORCE (plain SGD) with a moving-average baseline; profiles of new images '
           "from the last episode's saved weights, each image passed as a grid of non-overlapping patches; score = "
           'max of the smoothed map. Held-out normal images (a quarter) and the labelled anomalies stay unseen by '
           'the autoencoder so the predictor learns on profiles like those of new images. fast (reduced): 8 episodes '
           'of 50 steps, a pool of at most 4096 patches, at most 48 images per class for the profiles.',
  'trained': True,
  'cpu_bf16': False,
  'uses_backbone': False,
  'presets': {'test': {'episodes': 2,
                       'steps_per_episode': 8,
                       'n_records': 4,
                       'max_pool_patches': 1024,
                       'max_profile_images': 8,
                       'pred_epochs': 2,
                       'cls_epochs': 30},
              'fast': {'episodes': 8, 'steps_per_episode': 50, 'max_pool_patches': 4096, 'max_profile_images': 48},
              'quality': {'size': 128,
                          'patch': 32,
                          'stride': 16,
                          'widths': (32, 64, 128),
                          'region': 13,
                          'episodes': 40,
                          'steps_per_episode': 200,
                          'n_records': 20}},
  'reduced_presets': ('test', 'fast'),
  'module': 'engine.methods.weakly_supervised.neural_batch_sampler',
  'class_name': 'NeuralBatchSampler'}]
