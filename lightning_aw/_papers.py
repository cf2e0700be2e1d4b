"""The papers behind the built-in methods, by registry name (a bibliography: the method
classes name their entry with the ``name`` class keyword)."""

from __future__ import annotations

__all__ = ["PAPERS"]

PAPERS: dict[str, str] = {
    "aligned_mtl": (
        'Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for '
        'Multi-Task Learning", CVPR 2023, https://arxiv.org/abs/2305.19000'
    ),
    "auto_lambda": (
        'Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", '
        "TMLR 2022, https://arxiv.org/abs/2202.03091"
    ),
    "cagrad": (
        'Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task '
        'Learning", NeurIPS 2021, https://arxiv.org/abs/2110.14048'
    ),
    "con_fig": (
        'Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural '
        'Networks", ICLR 2025, https://arxiv.org/abs/2408.11104'
    ),
    "db_mtl": (
        'Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023, '
        "https://arxiv.org/abs/2308.12029"
    ),
    "dual_proj": (
        'Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, '
        "https://arxiv.org/abs/2406.16232"
    ),
    "dwa": (
        'Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, '
        "https://arxiv.org/abs/1803.10704"
    ),
    "excess_mtl": (
        'He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with '
        'Excess Risks", ICML 2024, https://openreview.net/forum?id=JzWFmMySpn'
    ),
    "fairgrad": (
        'Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, '
        "https://arxiv.org/abs/2402.15638"
    ),
    "modo": (
        'Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: '
        'Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023, '
        "https://arxiv.org/abs/2305.20057"
    ),
    "sdmgrad": (
        'Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable '
        'Stochastic Algorithms", NeurIPS 2023, https://arxiv.org/abs/2305.18409'
    ),
    "famo": (
        'Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, '
        "https://arxiv.org/abs/2306.03792"
    ),
    "gls": (
        'Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature '
        'Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops '
        "2019, https://arxiv.org/abs/1904.08492"
    ),
    "graddrop": (
        'Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: '
        'Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, '
        "https://arxiv.org/abs/2010.06808"
    ),
    "gradnorm": (
        'Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for '
        'Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, '
        "https://arxiv.org/abs/1711.02257"
    ),
    "gradvac": (
        'Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving '
        'Multi-task Optimization in Massively Multilingual Models", ICLR 2021, '
        "https://arxiv.org/abs/2010.05874"
    ),
    "imtl_g": (
        'Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task '
        'Learning", ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr'
    ),
    "imtl_l": (
        'Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task '
        'Learning", ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr'
    ),
    "lr_annealing": (
        'Wang, Teng & Perdikaris, "Understanding and mitigating gradient pathologies in '
        'physics-informed neural networks", SIAM J. Sci. Comput. 2021, '
        "https://arxiv.org/abs/2001.04536"
    ),
    "mgda": (
        'Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, '
        "https://arxiv.org/abs/1810.04650"
    ),
    "moco": (
        'Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in '
        'Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, '
        "https://openreview.net/forum?id=dLAYGdKTi2"
    ),
    "nash_mtl": (
        'Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning '
        'as a Bargaining Game", ICML 2022, https://arxiv.org/abs/2202.01017'
    ),
    "pcgrad": (
        'Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task '
        'Learning", NeurIPS 2020, https://arxiv.org/abs/2001.06782'
    ),
    "relobralo": (
        'Bischof & Kraus, "Multi-Objective Loss Balancing for Physics-Informed Deep Learning", '
        "arXiv 2021, https://arxiv.org/abs/2110.09813"
    ),
    "rlw": (
        'Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test '
        'for Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603'
    ),
    "scale_invariant": (
        'baseline in Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, '
        "https://arxiv.org/abs/2202.01017"
    ),
    "softadapt": (
        'Heydari, Thompson & Mehmood, "SoftAdapt: Techniques for Adaptive Loss Weighting of '
        'Neural Networks with Multi-Part Loss Functions", 2019, '
        "https://arxiv.org/abs/1912.12355"
    ),
    "stch": (
        'Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for '
        'Multi-Objective Optimization", ICML 2024, https://arxiv.org/abs/2402.19078'
    ),
    "uncertainty": (
        'Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for '
        'Scene Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115'
    ),
    "upgrad": (
        'Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, '
        "https://arxiv.org/abs/2406.16232"
    ),
}
