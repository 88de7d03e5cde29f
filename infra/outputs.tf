output "bucket_name" {
  description = "S3 bucket for inputs (inputs/), workdirs (runs/), scratch (tmp/), logs (logs/) and bootstrap files (bootstrap/)."
  value       = aws_s3_bucket.data.id
}

output "region" {
  description = "AWS region everything was created in (infra/aws.sh passes it to every AWS CLI call)."
  value       = var.region
}

output "kms_key_arn" {
  description = "KMS key encrypting the bucket, the EMR local disks and the EMR logs."
  value       = aws_kms_key.data.arn
}

output "cluster_id" {
  description = "EMR cluster id (j-...)."
  value       = aws_emr_cluster.main.id
}

output "master_dns" {
  description = "DNS name of the master node (private: reachable from inside the VPC, or through SSM)."
  value       = aws_emr_cluster.main.master_public_dns
}

output "upload_inputs_command" {
  description = "Command that copies a local folder of images to the inputs/ prefix."
  value       = "aws s3 sync ./images/ s3://${aws_s3_bucket.data.id}/inputs/ --region ${var.region}"
}

output "run_step_args" {
  description = "Arguments of the EMR step that runs the whole pipeline (ingest, embed on Ray, PCA); RUN_ID is a placeholder."
  value       = local.run_step_args
}

output "submit_run_command" {
  description = "Command that submits the pipeline as an EMR step; replace RUN_ID (a new name per run, or an old one to resume it)."
  value = join(" ", [
    "aws emr add-steps --region ${var.region} --cluster-id ${aws_emr_cluster.main.id} --steps",
    "'Type=CUSTOM_JAR,Name=m9-run,ActionOnFailure=CONTINUE,Jar=command-runner.jar,Args=[${join(",", local.run_step_args)}]'",
  ])
}

output "step_status_command" {
  description = "Command that lists the cluster's steps and their state."
  value       = "aws emr list-steps --region ${var.region} --cluster-id ${aws_emr_cluster.main.id}"
}

output "ssm_session_command" {
  description = "Command that opens a Session Manager shell on the master node (no SSH port needed); the session is logged to logs/ssm/."
  value = join(" ", [
    "aws ssm start-session --region ${var.region} --document-name ${aws_ssm_document.session.name} --target",
    "\"$(aws emr list-instances --region ${var.region} --cluster-id ${aws_emr_cluster.main.id} --instance-group-types MASTER --query 'Instances[0].Ec2InstanceId' --output text)\"",
  ])
}

output "teardown_commands" {
  description = "Commands that stop billing: terminate the cluster now, or destroy everything (the bucket survives unless force_destroy_bucket or it is empty)."
  value = [
    "aws emr terminate-clusters --region ${var.region} --cluster-ids ${aws_emr_cluster.main.id}",
    "terraform -chdir=infra destroy -var m9_dist=${var.m9_dist}",
  ]
}

output "ray_token_parameter" {
  description = "SSM SecureString holding Ray's token (encrypted with kms_key_arn); the nodes read it at boot."
  value       = aws_ssm_parameter.ray_token.name
}

output "session_document" {
  description = "Session Manager document for logged shell sessions on the nodes (infra/aws.sh shell uses it)."
  value       = aws_ssm_document.session.name
}

output "operator_policy_arn" {
  description = "IAM policy to attach to whoever operates the cluster: Session Manager sessions on its nodes, only with the recorded shell document or AWS's port-forwarding documents."
  value       = aws_iam_policy.operator.arn
}
